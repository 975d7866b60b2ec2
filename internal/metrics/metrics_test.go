package metrics

import (
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/migrated/migrated/pkg/phaul"
)

func ev(id string, p phaul.Phase, at time.Duration) phaul.Event {
	return phaul.Event{ID: id, Phase: p, Elapsed: at}
}

func TestObserveMigrations(t *testing.T) {
	m := New()
	// A pre-copy migration that moves.
	m.Observe(ev("a", phaul.PhasePrepare, 0))
	if got := testutil.ToFloat64(m.inFlight); got != 1 {
		t.Fatalf("in flight %v after the first event, want 1", got)
	}
	m.Observe(ev("a", phaul.PhasePrepare, 100*time.Millisecond))
	m.Observe(phaul.Event{ID: "a", Phase: phaul.PhasePrecopy, Elapsed: 200 * time.Millisecond, DirtyRate: 1 << 20})
	m.Observe(phaul.Event{ID: "a", Phase: phaul.PhasePrecopy, Elapsed: 1200 * time.Millisecond, DirtyRate: 2 << 20})
	m.Observe(ev("a", phaul.PhaseDump, 1500*time.Millisecond))
	// A second migration in flight at the same time, then cancelled.
	m.Observe(ev("b", phaul.PhasePrepare, 0))
	if got := testutil.ToFloat64(m.inFlight); got != 2 {
		t.Fatalf("in flight %v, want 2", got)
	}
	m.Observe(ev("a", phaul.PhaseCommit, 2000*time.Millisecond))
	m.Observe(phaul.Event{ID: "a", Phase: phaul.PhaseDone, Elapsed: 2100 * time.Millisecond, Outcome: &phaul.Outcome{
		Moved: true, Downtime: 300 * time.Millisecond, Total: 2100 * time.Millisecond, Rounds: 3, RawBytes: 1000, WireBytes: 400,
	}})
	m.Observe(phaul.Event{ID: "b", Phase: phaul.PhaseFailed, Elapsed: 50 * time.Millisecond, Outcome: &phaul.Outcome{
		Err: phaul.ErrCanceled, FailedPhase: phaul.PhasePrepare, Total: 50 * time.Millisecond,
	}})
	// A failure recovered after a restart: its start was never seen.
	m.Observe(phaul.Event{ID: "c", Phase: phaul.PhaseFailed, Outcome: &phaul.Outcome{Err: errors.New("boom"), FailedPhase: phaul.PhaseRestore, WireBytes: 10}})

	if got := testutil.ToFloat64(m.inFlight); got != 0 {
		t.Fatalf("in flight %v at the end, want 0", got)
	}
	for _, tc := range []struct {
		result string
		want   float64
	}{{ResultMoved, 1}, {ResultCancelled, 1}, {ResultFailed, 1}} {
		if got := testutil.ToFloat64(m.migrations.WithLabelValues(tc.result)); got != tc.want {
			t.Errorf("migrations{result=%s} = %v, want %v", tc.result, got, tc.want)
		}
	}
	if got := testutil.ToFloat64(m.bytes.WithLabelValues("wire")); got != 410 {
		t.Errorf("wire bytes %v, want 410", got)
	}
	if got := testutil.ToFloat64(m.failedPhase.WithLabelValues("restore")); got != 1 {
		t.Errorf("failed in restore %v, want 1", got)
	}
	// Phase durations: prepare 0.2 s (a) and 0.05 s (b), precopy 1.3 s,
	// dump 0.5 s, commit 0.1 s.
	want := map[string]struct {
		count uint64
		sum   float64
	}{"prepare": {2, 0.25}, "precopy": {1, 1.3}, "dump": {1, 0.5}, "commit": {1, 0.1}}
	for phase, w := range want {
		h := m.phase.WithLabelValues(phase)
		var count uint64
		var sum float64
		pb := metricOf(t, h.(prometheus.Metric))
		count, sum = pb.GetHistogram().GetSampleCount(), pb.GetHistogram().GetSampleSum()
		if count != w.count || sum < w.sum-1e-9 || sum > w.sum+1e-9 {
			t.Errorf("phase %s: count %d sum %v, want %d and %v", phase, count, sum, w.count, w.sum)
		}
	}
	if c := metricOf(t, m.dirty).GetHistogram().GetSampleCount(); c != 2 {
		t.Errorf("dirty rate observations %d, want 2", c)
	}
	if s := metricOf(t, m.downtime).GetHistogram().GetSampleSum(); s != 0.3 {
		t.Errorf("downtime sum %v, want 0.3", s)
	}

	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, name := range []string{"migrated_migrations_total", "migrated_migration_phase_duration_seconds_bucket", "migrated_migration_downtime_seconds",
		"migrated_migration_bytes_total", "migrated_migration_precopy_rounds", "migrated_migration_dirty_rate_bytes_per_second",
		"migrated_migrations_in_flight", "go_goroutines"} {
		if !strings.Contains(rec.Body.String(), name) {
			t.Errorf("exposition lacks %s", name)
		}
	}
}

func TestRefusalCounters(t *testing.T) {
	m := New()
	m.PeerRefused()
	m.ControlDenied("/migrate.v1.Control/Move")
	m.ControlDenied("/migrate.v1.Control/Move")
	if got := testutil.ToFloat64(m.peerRefused); got != 1 {
		t.Fatalf("peer refusals %v", got)
	}
	if got := testutil.ToFloat64(m.controlDenied.WithLabelValues("/migrate.v1.Control/Move")); got != 2 {
		t.Fatalf("control denials %v", got)
	}
}
