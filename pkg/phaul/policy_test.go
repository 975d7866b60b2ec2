package phaul

import (
	"testing"
	"time"
)

func TestPolicyDecide(t *testing.T) {
	p := DefaultPolicy()
	p.DumpRate = 0 // keep the arithmetic visible
	p.FreezeCost = 100 * time.Millisecond
	mib := uint64(1 << 20)
	full := RoundStats{PagesScanned: 25600, PagesChanged: 25600, BytesRaw: 100 * mib, Duration: time.Second, DirtyRate: 4 * float64(mib)}
	small := func(pages uint64) RoundStats {
		return RoundStats{PagesScanned: 25600, PagesChanged: pages, BytesRaw: pages * 4096, Duration: 100 * time.Millisecond}
	}
	tests := []struct {
		name   string
		rounds []RoundStats
		max    int
		stop   bool
		reason StopReason
	}{
		{"first round never stops", []RoundStats{full}, 10, false, ""},
		{"converged", []RoundStats{full, small(256)}, 10, true, StopConverged},
		{"nothing dirty", []RoundStats{full, small(0)}, 10, true, StopNothingDirty},
		{"round limit", []RoundStats{full, small(25000)}, 2, true, StopRoundLimit},
		{"another round while shrinking", []RoundStats{full, small(20000), small(10000)}, 10, false, ""},
		{"not shrinking", []RoundStats{full, small(20000), small(19900)}, 10, true, StopNotShrinking},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := p
			p.MaxRounds = tt.max
			d := p.Decide(tt.rounds, 100*mib)
			if d.Stop != tt.stop || d.Reason != tt.reason {
				t.Fatalf("Decide = stop %v reason %q (%s), want stop %v reason %q", d.Stop, d.Reason, d.Explanation, tt.stop, tt.reason)
			}
			if d.Explanation == "" {
				t.Fatal("decision without an explanation")
			}
		})
	}
}

func TestPolicyEstimate(t *testing.T) {
	p := Policy{FreezeCost: 100 * time.Millisecond, DumpRate: 1 << 30}
	got := p.Estimate(50<<20, 100<<20, 1<<30)
	want := 100*time.Millisecond + 500*time.Millisecond + time.Second
	if d := got - want; d < -time.Millisecond || d > time.Millisecond {
		t.Fatalf("Estimate = %v, want %v", got, want)
	}
}
