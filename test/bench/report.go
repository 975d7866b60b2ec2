package main

import (
	"encoding/csv"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// runsHeader are the columns of runs.csv, one row per run.
var runsHeader = []string{"link", "workload", "mem_mib", "hot_mib", "compressible", "method", "run", "error",
	"seen_downtime_ms", "reported_downtime_ms", "total_ms", "wire_bytes", "tool_wire_bytes", "rounds",
	"src_cpu_s", "dst_cpu_s", "criu_cpu_s", "src_peak_mib", "dst_peak_mib", "phases", "criu_stats"}

func f1(v float64) string  { return strconv.FormatFloat(v, 'f', 1, 64) }
func f2(v float64) string  { return strconv.FormatFloat(v, 'f', 2, 64) }
func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func phasesString(ps []phase) string {
	var parts []string
	for _, p := range ps {
		parts = append(parts, fmt.Sprintf("%s=%.0f", p.Name, ms(p.Dur)))
	}
	return strings.Join(parts, " ")
}

// writeRuns writes every run so far to runs.csv.
func writeRuns(dir string, rs []result) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rows := [][]string{runsHeader}
	for _, r := range rs {
		w := r.Workload
		rows = append(rows, []string{r.Link, w.String(), strconv.Itoa(w.MemMiB), strconv.Itoa(w.HotMiB),
			strconv.FormatBool(w.Compressible), r.Method, strconv.Itoa(r.Run), r.Err,
			f1(ms(r.SeenDowntime)), f1(ms(r.ReportedDowntime)), f1(ms(r.Total)),
			strconv.FormatUint(r.WireBytes, 10), strconv.FormatUint(r.ToolWireBytes, 10), strconv.Itoa(r.Rounds),
			f2(r.SrcCPU.Seconds()), f2(r.DstCPU.Seconds()), f2(r.CRIUCPU.Seconds()),
			f1(mib(r.SrcPeak)), f1(mib(r.DstPeak)), phasesString(r.Phases), r.CRIUStats})
	}
	return writeCSV(filepath.Join(dir, "runs.csv"), rows)
}

func writeCSV(path string, rows [][]string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := csv.NewWriter(f)
	w.WriteAll(rows)
	if err := w.Error(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// summary is the medians of the successful runs of one method in one case.
type summary struct {
	Link     string
	Workload workload
	Method   string
	OK, N    int

	Seen, Reported, Total float64 // ms
	Wire                  float64 // MiB
	Rounds                float64
	SrcCPU, DstCPU, CRIU  float64 // s
	SrcPeak, DstPeak      float64 // MiB
	Phases                []phase // median per phase name, in order of appearance
	CRIUStats             string  // of the median-downtime run
}

func summarize(rs []result) []summary {
	type key struct {
		link, wl, method string
	}
	idx := map[key]int{}
	var out []summary
	groups := [][]result{}
	for _, r := range rs {
		k := key{r.Link, r.Workload.String(), r.Method}
		i, ok := idx[k]
		if !ok {
			i = len(out)
			idx[k] = i
			out = append(out, summary{Link: r.Link, Workload: r.Workload, Method: r.Method})
			groups = append(groups, nil)
		}
		groups[i] = append(groups[i], r)
	}
	for i := range out {
		s := &out[i]
		var ok []result
		for _, r := range groups[i] {
			s.N++
			if r.Err == "" {
				ok = append(ok, r)
			}
		}
		s.OK = len(ok)
		if len(ok) == 0 {
			continue
		}
		med := func(f func(r result) float64) float64 {
			var xs []float64
			for _, r := range ok {
				xs = append(xs, f(r))
			}
			return median(xs)
		}
		s.Seen = med(func(r result) float64 { return ms(r.SeenDowntime) })
		s.Reported = med(func(r result) float64 { return ms(r.ReportedDowntime) })
		s.Total = med(func(r result) float64 { return ms(r.Total) })
		s.Wire = med(func(r result) float64 { return mib(r.WireBytes) })
		s.Rounds = med(func(r result) float64 { return float64(r.Rounds) })
		s.SrcCPU = med(func(r result) float64 { return r.SrcCPU.Seconds() })
		s.DstCPU = med(func(r result) float64 { return r.DstCPU.Seconds() })
		s.CRIU = med(func(r result) float64 { return r.CRIUCPU.Seconds() })
		s.SrcPeak = med(func(r result) float64 { return mib(r.SrcPeak) })
		s.DstPeak = med(func(r result) float64 { return mib(r.DstPeak) })
		var names []string
		for _, r := range ok {
			for _, p := range r.Phases {
				if !slices.Contains(names, p.Name) {
					names = append(names, p.Name)
				}
			}
		}
		for _, n := range names {
			d := med(func(r result) float64 {
				for _, p := range r.Phases {
					if p.Name == n {
						return ms(p.Dur)
					}
				}
				return 0
			})
			s.Phases = append(s.Phases, phase{n, time.Duration(d * float64(time.Millisecond))})
		}
		best := ok[0]
		for _, r := range ok {
			if abs(ms(r.SeenDowntime)-s.Seen) < abs(ms(best.SeenDowntime)-s.Seen) {
				best = r
			}
		}
		s.CRIUStats = best.CRIUStats
	}
	return out
}

func abs(v float64) float64 {
	if v < 0 {
		return -v
	}
	return v
}

// writeReport writes summary.csv, results.md and the plots.
func writeReport(cfg config, rs []result, took time.Duration) error {
	if err := writeRuns(cfg.Out, rs); err != nil {
		return err
	}
	ss := summarize(rs)
	rows := [][]string{{"link", "workload", "method", "ok", "runs", "seen_downtime_ms", "reported_downtime_ms", "total_ms",
		"wire_mib", "wire_per_mem", "rounds", "src_cpu_s", "dst_cpu_s", "criu_cpu_s", "src_peak_mib", "dst_peak_mib", "phases_ms"}}
	for _, s := range ss {
		rows = append(rows, []string{s.Link, s.Workload.String(), s.Method, strconv.Itoa(s.OK), strconv.Itoa(s.N),
			f1(s.Seen), f1(s.Reported), f1(s.Total), f1(s.Wire), wireRatio(s), f1(s.Rounds),
			f2(s.SrcCPU), f2(s.DstCPU), f2(s.CRIU), f1(s.SrcPeak), f1(s.DstPeak), phasesString(s.Phases)})
	}
	if err := writeCSV(filepath.Join(cfg.Out, "summary.csv"), rows); err != nil {
		return err
	}
	plots, err := writePlots(cfg.Out, ss)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(cfg.Out, "results.md"), []byte(markdown(cfg, ss, plots, took)), 0o644)
}

func wireRatio(s summary) string {
	if s.Workload.MemMiB == 0 || s.OK == 0 {
		return ""
	}
	return f2(s.Wire / float64(s.Workload.MemMiB))
}

func find(ss []summary, link, wl, method string) (summary, bool) {
	for _, s := range ss {
		if s.Link == link && s.Workload.String() == wl && s.Method == method && s.OK > 0 {
			return s, true
		}
	}
	return summary{}, false
}

// target is one of the targets, evaluated on this run's medians.
type target struct {
	What, Figures, Verdict string
}

func verdict(v, limit float64) string {
	if v <= limit {
		return fmt.Sprintf("met (%.2f ≤ %.2f)", v, limit)
	}
	return fmt.Sprintf("missed by %.0f%% (%.2f > %.2f)", (v/limit-1)*100, v, limit)
}

func targets(ss []summary) []target {
	var ts []target
	const wl = "memhog-1024M-hot16"
	pre, ok1 := find(ss, link1Gbit, wl, methodPrecopy)
	cold, ok2 := find(ss, link1Gbit, wl, methodCold)
	if ok1 && ok2 {
		ts = append(ts, target{"precopy downtime ≤ 0.3 × cold downtime (1 GiB, 16 MiB hot, 1 Gbit/s)",
			fmt.Sprintf("precopy %.0f ms, cold %.0f ms", pre.Seen, cold.Seen), verdict(pre.Seen/cold.Seen, 0.3)})
	}
	floor, ok3 := find(ss, linkUnshaped, wl, methodFloor)
	if ok1 && ok3 {
		ts = append(ts, target{"precopy downtime ≤ 1.3 × local floor (1 GiB, 16 MiB hot, 1 Gbit/s)",
			fmt.Sprintf("precopy %.0f ms, floor %.0f ms", pre.Seen, floor.Seen), verdict(pre.Seen/floor.Seen, 1.3)})
	}
	if p, ok := find(ss, linkUnshaped, wl, methodPrecopy); ok && ok3 {
		ts = append(ts, target{"precopy downtime ≤ 1.3 × local floor (1 GiB, 16 MiB hot, unshaped)",
			fmt.Sprintf("precopy %.0f ms, floor %.0f ms", p.Seen, floor.Seen), verdict(p.Seen/floor.Seen, 1.3)})
	}
	for _, s := range ss {
		w := s.Workload
		if s.OK == 0 || w.Kind != "memhog" {
			continue
		}
		if s.Method == methodPrecopy && w.HotMiB == 16 && !w.Compressible {
			ts = append(ts, target{fmt.Sprintf("precopy wire ≤ 1.1 × memory (%s, %s)", w, s.Link),
				fmt.Sprintf("%.0f MiB for %d MiB", s.Wire, w.MemMiB), verdict(s.Wire/float64(w.MemMiB), 1.1)})
		}
		if s.Method == methodPrecopyZstd && w.Compressible {
			ts = append(ts, target{fmt.Sprintf("precopy+zstd wire ≤ 0.5 × memory (%s, %s)", w, s.Link),
				fmt.Sprintf("%.0f MiB for %d MiB", s.Wire, w.MemMiB), verdict(s.Wire/float64(w.MemMiB), 0.5)})
		}
		if s.Method == methodStopcopy && s.Link == linkUnshaped {
			if ps, ok := find(ss, linkUnshaped, w.String(), methodPageServer); ok {
				ts = append(ts, target{fmt.Sprintf("stopcopy downtime within 1.2 × page server (%s, unshaped)", w),
					fmt.Sprintf("stopcopy %.0f ms, page server %.0f ms", s.Seen, ps.Seen), verdict(s.Seen/ps.Seen, 1.2)})
			}
		}
	}
	return ts
}

func cmdOut(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func markdown(cfg config, ss []summary, plots []string, took time.Duration) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	kind := "full run"
	if cfg.Quick {
		kind = "quick subset"
	}
	p("# Migration benchmark results (%s)\n\n", kind)
	p("%s, %d runs per method and case (medians of the successful ones), %v in all. Machine: %s, %d CPUs, %s, kernel %s. `test/bench/README.md` explains the methods and columns.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), cfg.Runs, took.Round(time.Second), cmdOut("uname", "-m"),
		runtime.NumCPU(), cmdOut("criu", "--version"), cmdOut("uname", "-r"))
	if ts := targets(ss); len(ts) > 0 {
		p("## Targets\n\n| target | figures | verdict |\n|---|---|---|\n")
		for _, t := range ts {
			p("| %s | %s | %s |\n", t.What, t.Figures, t.Verdict)
		}
		p("\n")
	}
	for _, link := range []string{linkUnshaped, link1Gbit} {
		var rows []summary
		for _, s := range ss {
			if s.Link == link {
				rows = append(rows, s)
			}
		}
		if len(rows) == 0 {
			continue
		}
		p("## Link: %s\n\n", link)
		p("| workload | method | ok | downtime seen ms | reported ms | total ms | wire MiB | wire/mem | rounds | CPU src s | CPU dst s | of which CRIU s | peak src MiB | peak dst MiB |\n")
		p("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, s := range rows {
			if s.OK == 0 {
				p("| %s | %s | 0/%d | failed | | | | | | | | | | |\n", s.Workload, s.Method, s.N)
				continue
			}
			p("| %s | %s | %d/%d | %.0f | %.0f | %.0f | %.0f | %s | %.0f | %.2f | %.2f | %.2f | %.0f | %.0f |\n",
				s.Workload, s.Method, s.OK, s.N, s.Seen, s.Reported, s.Total, s.Wire, wireRatio(s), s.Rounds,
				s.SrcCPU, s.DstCPU, s.CRIU, s.SrcPeak, s.DstPeak)
		}
		p("\n")
	}
	p("## Where the time goes\n\nMedian phase durations in ms (migrated: from its events' elapsed_ms; CRIU methods: the commands' wall times) and CRIU's own statistics (stats-dump, stats-restore) of the median run.\n\n")
	p("| link | workload | method | phases ms | CRIU statistics |\n|---|---|---|---|---|\n")
	for _, s := range ss {
		if s.OK > 0 {
			p("| %s | %s | %s | %s | %s |\n", s.Link, s.Workload, s.Method, phasesString(s.Phases), s.CRIUStats)
		}
	}
	p("\n")
	if len(plots) > 0 {
		p("## Plots\n\nDowntime seen by the workload and total time against memory size (memhog, 16 MiB hot set, incompressible), one line per method. The floor does not use the link: the unshaped run's floor is drawn on both.\n\n")
		for _, f := range plots {
			p("![%s](%s)\n\n", strings.TrimSuffix(f, ".png"), f)
		}
	}
	return b.String()
}
