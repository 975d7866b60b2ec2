package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/test/e2e"
)

// Methods, in the order they are run and shown.
const (
	methodCold        = "cold"
	methodPageServer  = "pageserver"
	methodStopcopy    = "stopcopy"
	methodPrecopy     = "precopy"
	methodPrecopyZstd = "precopy-zstd"
	methodFloor       = "floor"
)

var methodOrder = []string{methodFloor, methodCold, methodPageServer, methodStopcopy, methodPrecopy, methodPrecopyZstd}

// Links.
const (
	linkUnshaped = "unshaped"
	link1Gbit    = "1gbit"
)

// workload describes what runs during a case.
type workload struct {
	Kind         string // "memhog" or "redis"
	MemMiB       int    // memhog: memory touched
	HotMiB       int    // memhog: part rewritten every second
	Compressible bool   // memhog: text-like content
	Keys         int    // redis: keys loaded
}

func (w workload) String() string {
	if w.Kind == "redis" {
		return fmt.Sprintf("redis-%dk", w.Keys/1000)
	}
	s := fmt.Sprintf("memhog-%dM-hot%d", w.MemMiB, w.HotMiB)
	if w.Compressible {
		s += "-text"
	}
	return s
}

// benchCase is one workload on one link, moved by each of Methods Runs times.
type benchCase struct {
	Link     string
	Workload workload
	Methods  []string
}

func (c benchCase) String() string { return c.Link + "/" + c.Workload.String() }

// result is one run of one method.
type result struct {
	Link     string
	Workload workload
	Method   string
	Run      int
	Err      string

	SeenDowntime     time.Duration // largest wall-clock gap the workload saw
	ReportedDowntime time.Duration // the tool's own figure
	Total            time.Duration
	WireBytes        uint64 // both directions, from the hosts' eth0 counters
	ToolWireBytes    uint64 // migrated's own count of bytes sent
	Rounds           int
	SrcCPU, DstCPU   time.Duration // tools, CRIU included
	CRIUCPU          time.Duration // the CRIU share of SrcCPU+DstCPU
	SrcPeak, DstPeak uint64        // bytes
	Phases           []phase       // where the time went
	CRIUStats        string        // CRIU's own statistics of the dump and restore
}

// phase is a named step of a run and its duration.
type phase struct {
	Name string
	Dur  time.Duration
}

// bed is the two hosts with a migrated agent each.
type bed struct {
	hosts   [2]*e2e.Host
	agents  [2]*e2e.Agent
	criu    string
	netcopy string
	log     io.Writer
	verbose bool
	seq     int
}

// newBed creates the hosts and starts the agents; everything is removed
// when t's scope ends.
func newBed(t testing.TB, log io.Writer, verbose bool) *bed {
	criu := e2e.RequireCRIU(t)
	hs := e2e.NewHosts(t, 2)
	b := &bed{criu: criu, log: log, verbose: verbose}
	copy(b.hosts[:], hs)
	for i, h := range hs {
		b.agents[i] = e2e.StartAgent(t, h)
	}
	b.netcopy = e2e.BuildTool(t, "./test/bench/netcopy")
	e2e.MemhogBinary(t)
	return b
}

// runCase starts the case's workload on host A and moves it back and forth
// runs times with each method, calling emit with every result. A failed
// run ends the case (the workload's state is unknown then).
func (b *bed) runCase(t testing.TB, c benchCase, runs int, emit func(result)) {
	t.Helper()
	if c.Link != linkUnshaped {
		for _, h := range b.hosts {
			h.Shape(t, c.Link)
		}
	}
	// Fresh daemons for each case: a Go daemon keeps memory it used for an
	// earlier, larger workload, which would show as this case's peak.
	for _, a := range b.agents {
		if info, err := a.Proc.Info(); err == nil && info.State != 'Z' {
			a.Stop(t)
		}
		// A daemon killed at the end of the last case may still be
		// exiting (freeing its memory) with its listener open.
		if err := waitPortFree(a.Host, peerPort, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		a.Start(t)
	}
	w := c.Workload
	cur := 0
	var p *e2e.Proc
	switch w.Kind {
	case "memhog":
		p = e2e.StartMemhog(t, b.hosts[0], e2e.MemhogOptions{MemMiB: w.MemMiB, HotMiB: w.HotMiB, Compressible: w.Compressible})
	case "redis":
		p = b.startRedis(t, w.Keys)
	default:
		t.Fatalf("unknown workload kind %q", w.Kind)
	}
	for run := 1; run <= runs; run++ {
		for _, m := range c.Methods {
			src, dst := cur, 1-cur
			r := result{Link: c.Link, Workload: w, Method: m, Run: run}
			err := b.runOne(t, p, src, dst, &r)
			if err != nil {
				r.Err = err.Error()
			}
			emit(r)
			if err != nil {
				t.Fatalf("%s run %d: %v", m, run, err)
			}
			p = p.On(b.hosts[dst])
			cur = dst
			fmt.Fprintf(b.log, "  %-13s run %d: seen %7.1f ms  reported %7.1f ms  total %7.1f ms  wire %6.0f MiB  rounds %d\n",
				m, run, ms(r.SeenDowntime), ms(r.ReportedDowntime), ms(r.Total), float64(r.WireBytes)/(1<<20), r.Rounds)
		}
	}
	e2e.Verify(t, p)
}

// runOne moves p from hosts[src] to hosts[dst] with r.Method and fills r.
func (b *bed) runOne(t testing.TB, p *e2e.Proc, src, dst int, r *result) error {
	t.Helper()
	S, D := b.hosts[src], b.hosts[dst]
	time.Sleep(200 * time.Millisecond) // let the last run's cleanup settle
	mark := time.Now()
	e2e.ResetGap(t, p)
	e2e.WaitStatus(t, p, func(s e2e.WorkloadStatus) bool { return s.Time.After(mark.Add(25 * time.Millisecond)) }, 30*time.Second)
	var agentPIDs [2]int
	var cpu0 [2]cpuTimes
	for i, a := range b.agents {
		g, err := a.Proc.GlobalPID()
		if err != nil {
			return fmt.Errorf("agent on %s: %w", a.Host.Name, err)
		}
		agentPIDs[i] = g
		if cpu0[i], err = readCPU(g); err != nil {
			return err
		}
		if err := resetHWM(g); err != nil {
			return err
		}
	}
	tx0, err := linkBytes(b.hosts)
	if err != nil {
		return err
	}

	var runErr error
	switch r.Method {
	case methodCold, methodPageServer, methodFloor:
		runErr = b.criuMove(t.Context(), S, D, p.PID, r)
	case methodStopcopy, methodPrecopy, methodPrecopyZstd:
		runErr = b.migratedMove(t, p.PID, src, dst, r)
		if runErr == nil {
			for i := range b.agents {
				c1, err := readCPU(agentPIDs[i])
				if err != nil {
					return err
				}
				hwm, err := readHWM(agentPIDs[i])
				if err != nil {
					return err
				}
				d := c1.Self - cpu0[i].Self + c1.Children - cpu0[i].Children
				r.CRIUCPU += c1.Children - cpu0[i].Children
				if i == src {
					r.SrcCPU, r.SrcPeak = d, hwm
				} else {
					r.DstCPU, r.DstPeak = d, hwm
				}
			}
		}
	default:
		return fmt.Errorf("unknown method %q", r.Method)
	}
	if runErr != nil {
		return runErr
	}
	end := time.Now()
	tx1, err := linkBytes(b.hosts)
	if err != nil {
		return err
	}
	r.WireBytes = tx1 - tx0

	q := p.On(D)
	if info, err := q.Info(); err != nil || info.State == 'T' || info.State == 'Z' {
		return fmt.Errorf("pid %d does not run on %s after the move (%v, state %c)", p.PID, D.Name, err, info.State)
	}
	s := e2e.WaitStatus(t, q, func(s e2e.WorkloadStatus) bool {
		return s.PID == p.PID && s.Time.After(end.Add(25*time.Millisecond))
	}, 30*time.Second)
	r.SeenDowntime = s.MaxGap
	return nil
}

// startRedis starts the redis workload (redisload and its redis-server) in
// host A and waits until the keys are loaded and writes flow.
func (b *bed) startRedis(t testing.TB, keys int) *e2e.Proc {
	t.Helper()
	bin := e2e.BuildTool(t, "./test/bench/redisload")
	h := b.hosts[0]
	b.seq++
	status := filepath.Join(h.Shared, fmt.Sprintf("redis.%d.status", b.seq))
	sock := filepath.Join(h.Shared, fmt.Sprintf("redis.%d.sock", b.seq))
	p := h.Start(t, e2e.StartOptions{StatusFile: status}, bin, "--keys", fmt.Sprint(keys), "--sock", sock, "--status", status)
	e2e.WaitStatus(t, p, func(s e2e.WorkloadStatus) bool { return s.PID == p.PID && s.Counter > 100 }, 2*time.Minute)
	return p
}

// linkBytes is what both hosts sent on eth0 so far.
func linkBytes(hs [2]*e2e.Host) (uint64, error) {
	var sum uint64
	for _, h := range hs {
		n, err := txBytes(h)
		if err != nil {
			return 0, err
		}
		sum += n
	}
	return sum, nil
}

// migratedMove runs migratectl move on the source agent.
func (b *bed) migratedMove(t testing.TB, pid, src, dst int, r *result) error {
	t.Helper()
	args := []string{"--mode", "precopy"}
	switch r.Method {
	case methodStopcopy:
		args = []string{"--mode", "stopcopy"}
	case methodPrecopyZstd:
		args = append(args, "--compress", "zstd")
	}
	start := time.Now()
	mr := b.agents[src].Move(t, pid, b.agents[dst], args...)
	wall := time.Since(start)
	if b.verbose {
		for _, e := range mr.Events {
			fmt.Fprintf(b.log, "    %6d ms %-8s %s\n", e.ElapsedMs, e.Phase, e.Message)
		}
	}
	if mr.Err != nil || mr.Last.Phase != "done" {
		return fmt.Errorf("migratectl move: %v: %s %s (last event %+v)", mr.Err, strings.TrimSpace(mr.Stderr), mr.Last.Error, mr.Last)
	}
	l := mr.Last
	if l.DowntimeMs == nil || l.TotalMs == nil || l.Rounds == nil || l.DestPID == nil {
		return fmt.Errorf("migratectl move: incomplete summary %+v", l)
	}
	if int(*l.DestPID) != pid {
		return fmt.Errorf("migratectl move: dest_pid %d, want %d", *l.DestPID, pid)
	}
	r.ReportedDowntime = time.Duration(*l.DowntimeMs) * time.Millisecond
	r.Total = time.Duration(*l.TotalMs) * time.Millisecond
	if r.Total == 0 {
		r.Total = wall
	}
	r.Rounds = int(*l.Rounds)
	r.ToolWireBytes = l.WireBytes
	r.Phases = eventPhases(mr.Events)
	var notes []string
	for _, e := range mr.Events {
		if e.Phase == "dump" && (e.PagesSent > 0 || e.PagesReferenced > 0) {
			notes = append(notes, fmt.Sprintf("final dump sent %d pages, referenced %d", e.PagesSent, e.PagesReferenced))
		}
	}
	r.CRIUStats = strings.Join(notes, "; ")
	return nil
}

// eventPhases turns the events' elapsed times into phase durations: a phase
// lasts from its first event to the first event of the next phase.
func eventPhases(evs []e2e.MoveEvent) []phase {
	type mark struct {
		name string
		at   int64
	}
	var marks []mark
	seen := map[string]bool{}
	for _, e := range evs {
		if !seen[e.Phase] {
			seen[e.Phase] = true
			marks = append(marks, mark{e.Phase, e.ElapsedMs})
		}
	}
	var out []phase
	for i := 0; i+1 < len(marks); i++ {
		out = append(out, phase{marks[i].name, time.Duration(marks[i+1].at-marks[i].at) * time.Millisecond})
	}
	return out
}

// toolRun is a finished command of a CRIU method.
type toolRun struct {
	Dur    time.Duration
	CPU    time.Duration
	MaxRSS uint64 // bytes
}

// runTool runs a command in h and returns its wall time and resource use
// (nsenter's rusage, which includes the waited-for command's).
func runTool(ctx context.Context, h *e2e.Host, name string, args ...string) (toolRun, error) {
	cmd := h.Command(ctx, name, args...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	tr := toolRun{Dur: time.Since(start)}
	if err != nil {
		return tr, fmt.Errorf("%s: %s %s: %v: %s", h.Name, filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	tr.fill(cmd.ProcessState)
	return tr, nil
}

func (tr *toolRun) fill(ps *os.ProcessState) {
	if ps == nil {
		return
	}
	tr.CPU = ps.UserTime() + ps.SystemTime()
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		tr.MaxRSS = uint64(ru.Maxrss) << 10
	}
}

// startTool starts a command in h that listens on port, and returns once it
// does.
func startTool(ctx context.Context, h *e2e.Host, port int, name string, args ...string) (func() (toolRun, error), error) {
	cmd := h.Command(ctx, name, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	wait := func() (toolRun, error) {
		err := <-done
		var tr toolRun
		if err != nil {
			return tr, fmt.Errorf("%s: %s: %v: %s", h.Name, filepath.Base(name), err, strings.TrimSpace(out.String()))
		}
		tr.fill(cmd.ProcessState)
		return tr, nil
	}
	if err := waitListening(h, port, 10*time.Second); err != nil {
		cmd.Cancel()
		wait()
		return nil, err
	}
	return wait, nil
}

// Ports of the CRIU methods' helpers on the destination, and migrated's
// peer API.
const (
	peerPort       = 7446
	copyPort       = 7447
	pageServerPort = 7448
)

// criuMove moves pid from S to D with the CRIU command line.
func (b *bed) criuMove(ctx context.Context, S, D *e2e.Host, pid int, r *result) (err error) {
	b.seq++
	base := filepath.Join("/dev/shm", fmt.Sprintf("mgbench-%d-%d", os.Getpid(), b.seq))
	dirS, dirD := filepath.Join(base, "src"), filepath.Join(base, "dst")
	for _, d := range []string{dirS, dirD} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	defer os.RemoveAll(base)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	pidArg := fmt.Sprint(pid)

	var srcRuns, dstRuns, criuRuns []toolRun
	var copyWait, psWait func() (toolRun, error)
	defer func() {
		// On an error the helpers may still wait for a peer: end them.
		cancel()
		if copyWait != nil {
			copyWait()
		}
		if psWait != nil {
			psWait()
		}
	}()
	restoreDir := dirD
	dumpArgs := []string{"dump", "-t", pidArg, "-D", dirS, "-o", "dump.log"}
	switch r.Method {
	case methodFloor:
		restoreDir = dirS
	case methodPageServer:
		if psWait, err = startTool(ctx, D, pageServerPort, b.criu, "page-server", "-D", dirD, "-o", "page-server.log",
			"--address", D.IP, "--port", fmt.Sprint(pageServerPort)); err != nil {
			return err
		}
		dumpArgs = append(dumpArgs, "--page-server", "--address", D.IP, "--port", fmt.Sprint(pageServerPort))
		fallthrough
	case methodCold:
		if copyWait, err = startTool(ctx, D, copyPort, b.netcopy, "recv", fmt.Sprintf("%s:%d", D.IP, copyPort), dirD); err != nil {
			return err
		}
	}

	start := time.Now()
	dump, err := runTool(ctx, S, b.criu, dumpArgs...)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, tail(filepath.Join(dirS, "dump.log")))
	}
	srcRuns = append(srcRuns, dump)
	criuRuns = append(criuRuns, dump)
	r.Phases = append(r.Phases, phase{"dump", dump.Dur})
	if psWait != nil {
		ps, err := psWait()
		psWait = nil
		if err != nil {
			return err
		}
		dstRuns = append(dstRuns, ps)
		criuRuns = append(criuRuns, ps)
	}
	if copyWait != nil {
		send, err := runTool(ctx, S, b.netcopy, "send", fmt.Sprintf("%s:%d", D.IP, copyPort), dirS)
		if err != nil {
			return err
		}
		recv, err := copyWait()
		copyWait = nil
		if err != nil {
			return err
		}
		srcRuns = append(srcRuns, send)
		dstRuns = append(dstRuns, recv)
		r.Phases = append(r.Phases, phase{"copy", send.Dur})
	}
	rst, err := runTool(ctx, D, b.criu, "restore", "-D", restoreDir, "-o", "restore.log", "-d")
	if err != nil {
		return fmt.Errorf("%w\n%s", err, tail(filepath.Join(restoreDir, "restore.log")))
	}
	dstRuns = append(dstRuns, rst)
	criuRuns = append(criuRuns, rst)
	r.Phases = append(r.Phases, phase{"restore", rst.Dur})
	r.Total = time.Since(start)
	r.ReportedDowntime = r.Total

	for _, x := range srcRuns {
		r.SrcCPU += x.CPU
		r.SrcPeak = max(r.SrcPeak, x.MaxRSS)
	}
	for _, x := range dstRuns {
		r.DstCPU += x.CPU
		r.DstPeak = max(r.DstPeak, x.MaxRSS)
	}
	for _, x := range criuRuns {
		r.CRIUCPU += x.CPU
	}
	r.CRIUStats = criuStats(dirS, restoreDir)
	return nil
}

// criuStats summarizes CRIU's statistics of a dump and a restore.
func criuStats(dumpDir, restoreDir string) string {
	var parts []string
	if d, err := criurpc.ReadDumpStats(dumpDir); err == nil {
		parts = append(parts, fmt.Sprintf("frozen %.0f ms (memdump %.0f, memwrite %.0f), %d pages written",
			ms(d.FrozenTime), ms(d.MemDumpTime), ms(d.MemWriteTime), d.PagesWritten))
	}
	if rs, err := criurpc.ReadRestoreStats(restoreDir); err == nil {
		parts = append(parts, fmt.Sprintf("restore %.0f ms (forking %.0f), %d pages restored",
			ms(rs.RestoreTime), ms(rs.ForkingTime), rs.PagesRestored))
	}
	return strings.Join(parts, "; ")
}

// tail returns the last lines of a log file.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// median of xs (0 for none).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}
