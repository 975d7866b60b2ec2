package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migrated/migrated/test/e2e"
)

// TestBenchSmoke runs the quick subset's smallest case once with every
// method, so that the benchmark keeps working: every method must move the
// workload (same PID, memory intact), the link methods must carry at least
// the workload's memory over the link and the floor none of it, and the
// report, CSV files and plots must be written. It asserts no timings.
func TestBenchSmoke(t *testing.T) {
	e2e.RequireCRIU(t)
	c := smokeCase()
	b := newBed(t, t.Output(), testing.Verbose())
	var rs []result
	b.runCase(t, c, 1, func(r result) { rs = append(rs, r) })
	if len(rs) != len(c.Methods) {
		t.Fatalf("%d results for %d methods", len(rs), len(c.Methods))
	}
	mem := uint64(c.Workload.MemMiB) << 20
	for _, r := range rs {
		if r.Err != "" {
			t.Errorf("%s: %s", r.Method, r.Err)
			continue
		}
		if r.SeenDowntime <= 0 || r.Total <= 0 || r.ReportedDowntime <= 0 {
			t.Errorf("%s: missing figures: seen %v, reported %v, total %v", r.Method, r.SeenDowntime, r.ReportedDowntime, r.Total)
		}
		if r.Method == methodFloor {
			if r.WireBytes > mem/10 {
				t.Errorf("floor sent %d bytes over the link, want none of the memory", r.WireBytes)
			}
		} else if r.WireBytes < mem*9/10 {
			t.Errorf("%s: %d bytes crossed the link, want at least 90%% of %d", r.Method, r.WireBytes, mem)
		}
		if len(r.Phases) == 0 {
			t.Errorf("%s: no phase breakdown", r.Method)
		}
	}
	dir := t.TempDir()
	if err := writeReport(config{Quick: true, Runs: 1, Out: dir}, rs, 0); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"runs.csv", "summary.csv", "results.md", "downtime-unshaped.png", "total-unshaped.png"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Size() == 0 {
			t.Errorf("report file %s missing or empty (%v)", f, err)
		}
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, m := range c.Methods {
		if !strings.Contains(string(md), "| "+m+" |") {
			t.Errorf("results.md has no row for %s", m)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, tt := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}
