package metrics

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/migrated/migrated/pkg/phaul"
)

// Results of a migration, the values of the result label.
const (
	ResultMoved     = "moved"
	ResultFailed    = "failed"
	ResultCancelled = "cancelled"
)

// Metrics holds the agent's metrics. It is safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	migrations    *prometheus.CounterVec
	failedPhase   *prometheus.CounterVec
	phase         *prometheus.HistogramVec
	downtime      prometheus.Histogram
	total         prometheus.Histogram
	bytes         *prometheus.CounterVec
	rounds        prometheus.Histogram
	dirty         prometheus.Histogram
	inFlight      prometheus.Gauge
	peerRefused   prometheus.Counter
	controlDenied *prometheus.CounterVec

	mu   sync.Mutex
	live map[string]*track
}

type track struct {
	phase phaul.Phase
	since time.Duration // elapsed time at the phase's first event
}

// New returns metrics in a fresh registry that also holds the Go runtime
// and process collectors.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "migrated_migrations_total", Help: "Migrations this agent ran as the source, by result (moved, failed, cancelled).",
		}, []string{"result"}),
		failedPhase: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "migrated_migrations_failed_phase_total", Help: "Migrations that did not move, by the phase that failed.",
		}, []string{"phase"}),
		phase: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "migrated_migration_phase_duration_seconds", Help: "Time spent in each phase of a migration.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 12),
		}, []string{"phase"}),
		downtime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "migrated_migration_downtime_seconds", Help: "Time a moved process was frozen, from the final dump to its resumption on the destination.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 12),
		}),
		total: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "migrated_migration_duration_seconds", Help: "Wall time of a migration, start to outcome.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 12),
		}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "migrated_migration_bytes_total", Help: "Memory bytes sent to destinations: raw (page contents) and wire (after compression and deduplication).",
		}, []string{"kind"}),
		rounds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "migrated_migration_precopy_rounds", Help: "Pre-copy rounds per migration.",
			Buckets: []float64{0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50},
		}),
		dirty: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "migrated_migration_dirty_rate_bytes_per_second", Help: "Rate at which processes dirtied memory, one observation per pre-copy round.",
			Buckets: prometheus.ExponentialBuckets(1<<16, 4, 10),
		}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "migrated_migrations_in_flight", Help: "Migrations this agent is running as the source.",
		}),
		peerRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "migrated_peer_handshakes_refused_total", Help: "Peer API connections refused at the TLS handshake.",
		}),
		controlDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "migrated_control_calls_denied_total", Help: "Control API calls refused for lack of permission, by method.",
		}, []string{"method"}),
		live: map[string]*track{},
	}
	m.reg.MustRegister(m.migrations, m.failedPhase, m.phase, m.downtime, m.total, m.bytes, m.rounds, m.dirty,
		m.inFlight, m.peerRefused, m.controlDenied,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{ResultMoved, ResultFailed, ResultCancelled} {
		m.migrations.WithLabelValues(r)
	}
	m.bytes.WithLabelValues("raw")
	m.bytes.WithLabelValues("wire")
	return m
}

// Registry returns the registry the metrics live in.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Observe takes one event of a source-side migration. It never blocks for
// long: it is called from the engine's event path.
func (m *Metrics) Observe(e phaul.Event) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, ok := m.live[e.ID]
	if !ok {
		if e.Outcome != nil && terminal(e.Phase) {
			// An outcome of a migration whose start was not seen (recovered
			// after a restart): count it, it was not in flight here.
			m.outcome(e.Outcome, false)
			return
		}
		t = &track{phase: e.Phase, since: e.Elapsed}
		m.live[e.ID] = t
		m.inFlight.Inc()
	}
	if e.Phase != t.phase {
		m.phaseEnded(t, e.Elapsed)
		t.phase, t.since = e.Phase, e.Elapsed
	}
	if e.Phase == phaul.PhasePrecopy && e.DirtyRate > 0 {
		m.dirty.Observe(e.DirtyRate)
	}
	if e.Outcome != nil {
		if !terminal(e.Phase) {
			m.phaseEnded(t, e.Outcome.Total)
		}
		delete(m.live, e.ID)
		m.outcome(e.Outcome, true)
	}
}

func (m *Metrics) phaseEnded(t *track, at time.Duration) {
	if terminal(t.phase) || at < t.since {
		return
	}
	m.phase.WithLabelValues(t.phase.String()).Observe((at - t.since).Seconds())
}

func (m *Metrics) outcome(o *phaul.Outcome, wasLive bool) {
	if wasLive {
		m.inFlight.Dec()
	}
	switch {
	case o.Moved:
		m.migrations.WithLabelValues(ResultMoved).Inc()
		m.downtime.Observe(o.Downtime.Seconds())
	case errors.Is(o.Err, phaul.ErrCanceled) || errors.Is(o.Err, context.Canceled):
		m.migrations.WithLabelValues(ResultCancelled).Inc()
		m.failedPhase.WithLabelValues(o.FailedPhase.String()).Inc()
	default:
		m.migrations.WithLabelValues(ResultFailed).Inc()
		m.failedPhase.WithLabelValues(o.FailedPhase.String()).Inc()
	}
	m.total.Observe(o.Total.Seconds())
	m.rounds.Observe(float64(o.Rounds))
	m.bytes.WithLabelValues("raw").Add(float64(o.RawBytes))
	m.bytes.WithLabelValues("wire").Add(float64(o.WireBytes))
}

// PeerRefused counts a Peer API connection refused at the TLS handshake.
func (m *Metrics) PeerRefused() { m.peerRefused.Inc() }

// ControlDenied counts a Control API call refused for lack of permission.
func (m *Metrics) ControlDenied(method string) { m.controlDenied.WithLabelValues(method).Inc() }

func terminal(p phaul.Phase) bool { return p == phaul.PhaseDone || p == phaul.PhaseFailed }
