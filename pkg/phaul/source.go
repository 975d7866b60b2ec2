package phaul

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/migrated/migrated/pkg/pagexfer"
)

// SourceConfig wires a Source.
type SourceConfig struct {
	Local   Local
	Dial    func(ctx context.Context, addr string) (Peer, error)
	Journal *Journal
	Logger  hclog.Logger
	// Policy is the default convergence policy; requests override the
	// target and the round limit.
	Policy Policy
	// CommitRetry is how long the source keeps re-sending a decision
	// in the foreground before reporting and re-sending it in the
	// background (default 20 s).
	CommitRetry time.Duration
	// Hooks are failpoints for tests; nil in production.
	Hooks Hooks
	// Observe, when set, sees every event of every migration (metrics).
	// It must not block.
	Observe func(Event)
}

// Hooks lets tests inject faults at phase boundaries. A hook that returns
// an error fails the migration there.
type Hooks interface {
	At(ctx context.Context, point string) error
}

// Source runs migrations of local process trees to other hosts. It is
// safe for concurrent use; each migration runs in its own goroutine, owned
// by the Source until Close.
type Source struct {
	cfg SourceConfig
	log hclog.Logger

	mu         sync.Mutex
	migrations map[string]*Migration
	wg         sync.WaitGroup
	closing    bool
	recovering []context.CancelFunc
}

// NewSource returns a Source.
func NewSource(cfg SourceConfig) *Source {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Policy.MaxRounds == 0 {
		cfg.Policy = DefaultPolicy()
	}
	if cfg.CommitRetry == 0 {
		cfg.CommitRetry = 20 * time.Second
	}
	return &Source{cfg: cfg, log: cfg.Logger, migrations: map[string]*Migration{}}
}

// Migration is a running or finished migration on the source.
type Migration struct {
	ID      string
	Req     MoveRequest
	Started time.Time

	cancel  context.CancelFunc
	observe func(Event)
	log     hclog.Logger

	mu        sync.Mutex
	events    []Event
	changed   chan struct{} // closed and replaced on every event
	done      chan struct{}
	outcome   *Outcome
	committed bool // past the commit point: cancel is refused
	canceled  bool
	phase     Phase
	state     string
}

// Phase returns the migration's current phase.
func (m *Migration) Phase() Phase {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.phase
}

// State returns the migration's commit-protocol state (a journal state).
func (m *Migration) State() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// Done is closed when the migration has ended.
func (m *Migration) Done() <-chan struct{} { return m.done }

// Outcome returns the result once Done is closed, nil before.
func (m *Migration) Outcome() *Outcome {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.outcome
}

// LastEvent returns the latest event.
func (m *Migration) LastEvent() (Event, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.events) == 0 {
		return Event{}, false
	}
	return m.events[len(m.events)-1], true
}

// Watch calls fn for every event of the migration from the first, in
// order, until the migration ends or ctx is done.
func (m *Migration) Watch(ctx context.Context, fn func(Event) error) error {
	next := 0
	for {
		m.mu.Lock()
		evs := m.events[next:]
		next = len(m.events)
		ch := m.changed
		ended := m.outcome != nil
		m.mu.Unlock()
		for _, e := range evs {
			if err := fn(e); err != nil {
				return err
			}
		}
		if ended {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (m *Migration) emit(e Event) {
	if m.observe != nil {
		defer func() { m.observe(e) }()
	}
	m.mu.Lock()
	e.ID = m.ID
	e.Elapsed = time.Since(m.Started)
	if m.log != nil {
		m.log.Debug("event", "phase", e.Phase, "round", e.Round, "message", e.Message)
	}
	if e.Phase != 0 {
		m.phase = e.Phase
	}
	m.events = append(m.events, e)
	if len(m.events) > 10000 {
		// Keep the first and the recent events of a pathological run.
		m.events = append(m.events[:100], m.events[len(m.events)-5000:]...)
	}
	close(m.changed)
	m.changed = make(chan struct{})
	m.mu.Unlock()
}

func (m *Migration) setState(s string) {
	m.mu.Lock()
	m.state = s
	m.mu.Unlock()
}

// Phase deadlines: a migration never hangs forever. A silent peer is
// detected sooner by the transport's keepalive.
var (
	PrepareTimeout  = time.Minute
	TransferTimeout = 10 * time.Minute
	RestoreTimeout  = 10 * time.Minute
	// RoundTimeout bounds one pre-copy round and the final dump.
	RoundTimeout = 30 * time.Minute
)

// NewID returns a fresh migration id.
func NewID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "m-" + time.Now().UTC().Format("20060102-150405") + "-" + hex.EncodeToString(b[:])
}

// Move starts migrating req.PID to req.Destination and returns at once;
// follow the migration with Watch and Done.
func (s *Source) Move(req MoveRequest) (*Migration, error) {
	if req.ID == "" {
		req.ID = NewID()
	}
	if !ValidID(req.ID) {
		return nil, fmt.Errorf("%w: %q", ErrBadID, req.ID)
	}
	if req.PID <= 0 {
		return nil, fmt.Errorf("%w: pid %d", ErrNoProcess, req.PID)
	}
	if req.Destination == "" {
		return nil, errors.New("no destination given")
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Migration{
		ID:      req.ID,
		Req:     req,
		Started: time.Now(),
		cancel:  cancel,
		observe: s.cfg.Observe,
		log:     s.log.With("migration_id", req.ID),
		changed: make(chan struct{}),
		done:    make(chan struct{}),
		state:   StateStarted,
		phase:   PhasePrepare,
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		cancel()
		return nil, errors.New("agent is shutting down")
	}
	if _, ok := s.migrations[req.ID]; ok {
		s.mu.Unlock()
		cancel()
		return nil, fmt.Errorf("%w: %s", ErrExists, req.ID)
	}
	if _, err := s.cfg.Journal.Get(req.ID); err == nil {
		s.mu.Unlock()
		cancel()
		return nil, fmt.Errorf("%w: migration id %s is already in this host's journal", ErrExists, req.ID)
	}
	for _, other := range s.migrations {
		if other.Req.PID == req.PID && other.Outcome() == nil {
			s.mu.Unlock()
			cancel()
			return nil, fmt.Errorf("%w: pid %d is already being migrated by %s", ErrExists, req.PID, other.ID)
		}
	}
	s.migrations[req.ID] = m
	s.pruneLocked()
	s.wg.Add(1)
	s.mu.Unlock()

	go func() {
		defer s.wg.Done()
		defer cancel()
		out := s.run(ctx, m)
		m.mu.Lock()
		m.outcome = &out
		m.mu.Unlock()
		ph := PhaseDone
		msg := fmt.Sprintf("moved: pid %d runs on %s", out.DestPID, req.Destination)
		if !out.Moved {
			ph = PhaseFailed
			msg = "failed: " + out.Err.Error()
		}
		m.emit(Event{Phase: ph, Message: msg, Outcome: &out, WireBytes: out.WireBytes, RawBytes: out.RawBytes})
		close(m.done)
	}()
	return m, nil
}

// maxKept is how many finished migrations the Source keeps in memory
// (with their events); the journal keeps their records longer.
const maxKept = 64

func (s *Source) pruneLocked() {
	var ended []*Migration
	for _, m := range s.migrations {
		if m.Outcome() != nil {
			ended = append(ended, m)
		}
	}
	if len(ended) <= maxKept {
		return
	}
	sort.Slice(ended, func(a, b int) bool { return ended[a].Started.Before(ended[b].Started) })
	for _, m := range ended[:len(ended)-maxKept] {
		delete(s.migrations, m.ID)
	}
}

// Get returns a migration by id.
func (s *Source) Get(id string) (*Migration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.migrations[id]
	return m, ok
}

// List returns the migrations this Source ran since it started.
func (s *Source) List() []*Migration {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Migration, 0, len(s.migrations))
	for _, m := range s.migrations {
		out = append(out, m)
	}
	return out
}

// Cancel stops a migration before its commit point. The status quo is
// restored by the migration's own goroutine; wait on Done to see it.
func (s *Source) Cancel(id string) error {
	m, ok := s.Get(id)
	if !ok {
		return fmt.Errorf("%w: %s", ErrUnknownMigration, id)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.outcome != nil {
		if m.outcome.Moved {
			return fmt.Errorf("%w: migration %s committed; pid %d runs on %s", ErrTooLate, id, m.outcome.DestPID, m.Req.Destination)
		}
		return fmt.Errorf("%w: migration %s already ended", ErrBadState, id)
	}
	if m.committed {
		return fmt.Errorf("%w: migration %s decided to commit; the process is being resumed on the destination", ErrTooLate, id)
	}
	m.canceled = true
	m.cancel()
	return nil
}

// Close cancels migrations that have not reached their commit point,
// which restores their processes on this host, and waits for every
// migration goroutine to end. Migrations past the commit point finish.
func (s *Source) Close() {
	s.mu.Lock()
	s.closing = true
	ms := make([]*Migration, 0, len(s.migrations))
	for _, m := range s.migrations {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	for _, m := range ms {
		_ = s.Cancel(m.ID)
	}
	s.mu.Lock()
	for _, cancel := range s.recovering {
		cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Check runs the preflight of a move without touching the process.
func (s *Source) Check(ctx context.Context, req MoveRequest) (PrepareResult, []string, error) {
	var notes []string
	tree, err := s.cfg.Local.Inspect(ctx, req.PID)
	if err != nil {
		return PrepareResult{}, nil, err
	}
	notes = append(notes, fmt.Sprintf("process tree: %d task(s) %v, %d MiB private memory, %d open file(s)",
		len(tree.PIDs), tree.PIDs, tree.MemoryBytes>>20, len(tree.Files)))
	caps, err := s.cfg.Local.Capabilities(ctx)
	if err != nil {
		return PrepareResult{}, notes, fmt.Errorf("probing CRIU on the source: %w", err)
	}
	notes = append(notes, "pre-copy strategy: "+strategy(caps))
	cpu, err := s.cfg.Local.CPUInfo(ctx)
	if err != nil {
		return PrepareResult{}, notes, fmt.Errorf("criu cpuinfo dump on the source: %w", err)
	}
	peer, err := s.cfg.Dial(ctx, req.Destination)
	if err != nil {
		return PrepareResult{}, notes, err
	}
	defer peer.Close()
	res, err := peer.Prepare(ctx, PrepareRequest{
		ID: NewID(), Source: caps, PIDs: tree.PIDs, Files: tree.Files, CPUInfo: cpu,
		MemoryBytes: tree.MemoryBytes, TCPEstablished: req.TCPEstablished, ShellJob: req.ShellJob,
		CheckOnly: true,
	})
	if err != nil {
		return PrepareResult{}, notes, fmt.Errorf("destination %s: %w", req.Destination, err)
	}
	return res, notes, nil
}

func strategy(c Capabilities) string {
	if c.SoftDirty {
		return "soft-dirty tracking is available; content hashing is used for portability"
	}
	return "content hashing (this kernel has no soft-dirty tracking)"
}

// run is one migration from start to end. It never returns with two
// copies running: every failure before the commit point leaves the source
// running and the destination empty; after it, the decision is re-sent
// until acknowledged.
func (s *Source) run(ctx context.Context, m *Migration) (out Outcome) {
	req := m.Req
	log := s.log.With("migration_id", m.ID, "pid", req.PID, "destination", req.Destination)
	start := m.Started
	policy := s.cfg.Policy
	if req.DowntimeTarget > 0 {
		policy.DowntimeTarget = req.DowntimeTarget
	}
	if req.MaxRounds > 0 {
		policy.MaxRounds = req.MaxRounds
	}
	rec := Record{ID: m.ID, Role: "source", PID: req.PID, Peer: req.Destination, State: StateStarted, Phase: PhasePrepare.String(), Started: start}

	var (
		tree    Tree
		peer    Peer
		frozen  bool
		prepped bool
		rounds  []RoundStats
		wire    uint64
		raw     uint64
	)
	fail := func(ph Phase, err error) Outcome {
		loc := "source"
		advice := ""
		switch {
		case errors.Is(err, ErrNoProcess):
			loc = "nowhere"
			advice = "check the PID"
		case errors.Is(err, ErrProcessExited):
			loc = "nowhere"
			advice = "the process ended by itself; nothing to do"
		case m.canceledNow():
			err = fmt.Errorf("%w during %s", ErrCanceled, ph)
		}
		// The decision is durable before it is acted on. Resume first: the
		// destination never resumes its copy on its own, so the source may
		// run again before the abort is acknowledged.
		if frozen || prepped {
			rec.State, rec.Error = StateDecidedAbort, err.Error()
			if jerr := s.cfg.Journal.Put(rec); jerr != nil {
				log.Error("journal write failed", "error", jerr)
			}
		}
		if frozen {
			if rerr := s.cfg.Local.Resume(tree); rerr != nil {
				log.Error("resume on the source failed", "error", rerr)
				loc = "unknown"
				advice = fmt.Sprintf("resume the frozen tree by hand: kill -CONT %v", tree.PIDs)
			}
		}
		abortAcked := true
		if prepped {
			if aerr := s.abort(peer, m.ID, err.Error(), log); aerr != nil {
				abortAcked = false
				advice = strings.TrimPrefix(advice+"; ", "; ") + "the destination could not be told to discard its copy yet; it never resumes it on its own and this agent keeps re-sending the abort"
			}
		}
		s.cfg.Local.Cleanup(m.ID)
		if loc == "source" && advice == "" {
			advice = adviceFor(ph, err)
		}
		rec.State, rec.Error = StateAborted, err.Error()
		if !prepped && !frozen {
			rec.State = StateFailed
		}
		if !abortAcked {
			rec.State = StateDecidedAbort
		}
		if jerr := s.cfg.Journal.Put(rec); jerr != nil {
			log.Error("journal write failed", "error", jerr)
		}
		if !abortAcked {
			s.resend(rec, "")
		}
		m.setState(rec.State)
		log.Warn("migration failed", "phase", ph, "error", err, "process_location", loc)
		return Outcome{
			Err:         &PhaseError{ID: m.ID, Phase: ph, Err: err, Location: loc, Advice: advice},
			FailedPhase: ph, ProcessLocation: loc, Advice: advice,
			Total: time.Since(start), Rounds: len(rounds), WireBytes: wire, RawBytes: raw,
		}
	}
	hook := func(point string) error {
		if s.cfg.Hooks == nil {
			return nil
		}
		return s.cfg.Hooks.At(ctx, point)
	}

	// Prepare.
	m.emit(Event{Phase: PhasePrepare, Message: fmt.Sprintf("inspecting pid %d", req.PID)})
	var err error
	tree, err = s.cfg.Local.Inspect(ctx, req.PID)
	if err != nil {
		return fail(PhasePrepare, err)
	}
	rec.PIDs, rec.Identity = tree.PIDs, tree.Identity
	caps, err := s.cfg.Local.Capabilities(ctx)
	if err != nil {
		return fail(PhasePrepare, fmt.Errorf("probing CRIU on the source: %w", err))
	}
	cpu, err := s.cfg.Local.CPUInfo(ctx)
	if err != nil {
		return fail(PhasePrepare, fmt.Errorf("criu cpuinfo dump on the source: %w", err))
	}
	peer, err = s.cfg.Dial(ctx, req.Destination)
	if err != nil {
		return fail(PhasePrepare, fmt.Errorf("destination %s unreachable: %w", req.Destination, err))
	}
	defer peer.Close()
	if err := s.cfg.Journal.Put(rec); err != nil {
		return fail(PhasePrepare, err)
	}
	pctx, pcancel := context.WithTimeout(ctx, PrepareTimeout)
	defer pcancel()
	res, err := peer.Prepare(pctx, PrepareRequest{
		ID: m.ID, Source: caps, PIDs: tree.PIDs, Files: tree.Files, CPUInfo: cpu,
		MemoryBytes: tree.MemoryBytes, Compression: req.Compression,
		TCPEstablished: req.TCPEstablished, ShellJob: req.ShellJob,
	})
	if err != nil {
		return fail(PhasePrepare, fmt.Errorf("destination %s: %w", req.Destination, err))
	}
	if !res.OK {
		return fail(PhasePrepare, fmt.Errorf("%w on %s: %s", ErrPreflight, req.Destination, strings.Join(res.Problems, "; ")))
	}
	prepped = true
	m.emit(Event{Phase: PhasePrepare, Message: fmt.Sprintf("destination %s ready (CRIU %s); tree of %d task(s), %d MiB",
		req.Destination, res.Destination.CRIUVersion, len(tree.PIDs), tree.MemoryBytes>>20)})
	if err := hook("after-prepare"); err != nil {
		return fail(PhasePrepare, err)
	}

	// Pre-copy.
	stopReason := ""
	if req.Mode == ModePrecopy {
		rec.Phase = PhasePrecopy.String()
		_ = s.cfg.Journal.Put(rec)
		pc, err := s.cfg.Local.NewPrecopy(ctx, m.ID, tree, caps, req.Compression, req.BandwidthLimit)
		if err != nil {
			return fail(PhasePrecopy, err)
		}
		m.emit(Event{Phase: PhasePrecopy, Message: "pre-copy: " + strategy(caps)})
		for {
			n := len(rounds) + 1
			if err := hook("precopy-round"); err != nil {
				pc.Close()
				return fail(PhasePrecopy, err)
			}
			rctx, rcancel := context.WithTimeout(ctx, RoundTimeout)
			st, err := s.precopyRound(rctx, peer, pc, m.ID)
			rcancel()
			if err != nil {
				pc.Close()
				if !s.cfg.Local.Alive(tree) {
					err = fmt.Errorf("%w during pre-copy round %d", ErrProcessExited, n)
				}
				return fail(PhasePrecopy, err)
			}
			rounds = append(rounds, st)
			wire += st.BytesWire
			raw += st.BytesRaw
			d := policy.Decide(rounds, tree.MemoryBytes)
			m.emit(Event{
				Phase: PhasePrecopy, Round: n, Message: fmt.Sprintf("round %d: %d of %d pages changed; %s", n, st.PagesChanged, st.PagesScanned, d.Explanation),
				PagesScanned: st.PagesScanned, PagesSent: st.PagesChanged, RawBytes: raw, WireBytes: wire,
				Rate: rate(st.BytesRaw, st.Duration), DirtyRate: st.DirtyRate, EstimatedDowntime: d.EstimatedDowntime,
			})
			log.Debug("pre-copy round", "round", n, "pages_changed", st.PagesChanged, "duration", st.Duration, "decision", d.Explanation)
			if d.Stop {
				stopReason = string(d.Reason) + ": " + d.Explanation
				break
			}
		}
		pc.Close()
	}
	if ctx.Err() != nil {
		return fail(PhasePrecopy, ctx.Err())
	}

	// Freeze and final dump.
	rec.Phase = PhaseDump.String()
	_ = s.cfg.Journal.Put(rec)
	m.emit(Event{Phase: PhaseDump, Message: "freezing the tree for the final dump"})
	dctx, dcancel := context.WithTimeout(ctx, RoundTimeout)
	defer dcancel()
	dres, err := s.finalDump(dctx, peer, m, tree, req)
	if err != nil {
		if !s.cfg.Local.Alive(tree) {
			err = fmt.Errorf("%w before the final dump", ErrProcessExited)
		}
		return fail(PhaseDump, err)
	}
	frozen = true
	rec.State = StateFrozen
	m.setState(StateFrozen)
	if err := s.cfg.Journal.Put(rec); err != nil {
		return fail(PhaseDump, err)
	}
	wire += dres.Pages.WireBytes
	raw += dres.Pages.RawBytes
	m.emit(Event{Phase: PhaseDump, Message: fmt.Sprintf("final dump: %d pages sent, %d referenced", dres.Pages.PagesSent, dres.Pages.PagesReferenced),
		PagesSent: dres.Pages.PagesSent, PagesReferenced: dres.Pages.PagesReferenced, RawBytes: raw, WireBytes: wire})
	if err := hook("after-dump"); err != nil {
		return fail(PhaseDump, err)
	}

	// Transfer the other images.
	rec.Phase = PhaseTransfer.String()
	m.emit(Event{Phase: PhaseTransfer, Message: fmt.Sprintf("sending %d image files", len(dres.Files))})
	if err := hook("transfer"); err != nil {
		return fail(PhaseTransfer, err)
	}
	tctx, tcancel := context.WithTimeout(ctx, TransferTimeout)
	defer tcancel()
	if err := peer.SendImages(tctx, m.ID, dres.ImagesDir, dres.Files); err != nil {
		return fail(PhaseTransfer, fmt.Errorf("sending images: %w", err))
	}

	// Restore, stopped.
	rec.Phase = PhaseRestore.String()
	_ = s.cfg.Journal.Put(rec)
	m.emit(Event{Phase: PhaseRestore, Message: "restoring on " + req.Destination})
	if err := hook("restore"); err != nil {
		return fail(PhaseRestore, err)
	}
	rctx, rcancel := context.WithTimeout(ctx, RestoreTimeout)
	defer rcancel()
	destPID, err := peer.Restore(rctx, m.ID)
	if err != nil {
		return fail(PhaseRestore, fmt.Errorf("restore on %s: %w", req.Destination, err))
	}
	if err := hook("before-commit"); err != nil {
		return fail(PhaseRestore, err)
	}

	// The commit point.
	m.mu.Lock()
	if m.canceled || ctx.Err() != nil {
		m.mu.Unlock()
		return fail(PhaseRestore, context.Canceled)
	}
	m.committed = true
	m.mu.Unlock()
	rec.State, rec.Phase, rec.DestPID = StateDecidedCommit, PhaseCommit.String(), destPID
	if err := s.cfg.Journal.Put(rec); err != nil {
		// Without a durable decision there is no commit.
		m.mu.Lock()
		m.committed = false
		m.mu.Unlock()
		return fail(PhaseCommit, fmt.Errorf("writing the commit decision: %w", err))
	}
	m.setState(StateDecidedCommit)
	m.emit(Event{Phase: PhaseCommit, Message: fmt.Sprintf("committed: resuming pid %d on %s, then removing the frozen source copy", destPID, req.Destination)})
	if err := hook("after-decision"); err != nil {
		log.Warn("failpoint after the decision", "error", err)
	}
	// The frozen source copy stays until the destination acknowledges: it
	// cannot run again (the decision is durable and the source never
	// resumes after it), and while the destination's copy is unconfirmed
	// it is the only one known to exist.
	pid, err := s.sendCommit(peer, m.ID, log)
	if errors.Is(err, ErrDiscarded) {
		return s.destinationLost(m, rec, tree, err, log)
	}
	if err != nil {
		// The decision stands: keep re-sending it in the background; the
		// frozen source copy is removed once it is acknowledged.
		s.resend(rec, "")
		out := Outcome{
			Moved: false, DestPID: destPID, Total: time.Since(start), Rounds: len(rounds), WireBytes: wire, RawBytes: raw,
			FailedPhase: PhaseCommit, ProcessLocation: "destination",
			Advice: "the destination holds the restored process stopped and resumes it when the commit reaches it; this agent keeps re-sending it, and keeps the frozen source copy until the destination acknowledges (see migratectl status)",
		}
		out.Err = &PhaseError{ID: m.ID, Phase: PhaseCommit, Err: err, Location: "unknown", Advice: out.Advice}
		return out
	}
	// The destination runs the process from here: the downtime ends.
	downtime := time.Since(dres.FrozenAt)
	if err := hook("after-commit"); err != nil {
		log.Warn("failpoint after the commit", "error", err)
	}
	if err := s.cfg.Local.Kill(tree); err != nil {
		log.Error("removing the frozen source copy failed", "error", err)
	}
	rec.State = StateDone
	rec.Phase = PhaseDone.String()
	_ = s.cfg.Journal.Put(rec)
	m.setState(StateDone)
	s.cfg.Local.Cleanup(m.ID)
	log.Info("migration done", "dest_pid", pid, "downtime", downtime, "rounds", len(rounds), "wire_bytes", wire)
	return Outcome{
		Moved: true, DestPID: pid, Downtime: downtime, Total: time.Since(start),
		Rounds: len(rounds), WireBytes: wire, RawBytes: raw, ProcessLocation: "destination",
		PrecopyStopReason: stopReason,
	}
}

// destinationLost handles a commit the destination answers with
// ErrDiscarded: it holds no copy and has recorded the migration as aborted,
// so it will never resume one. The frozen source copy, the only one left,
// resumes.
func (s *Source) destinationLost(m *Migration, rec Record, tree Tree, err error, log hclog.Logger) Outcome {
	log.Error("the destination lost its restored copy after the commit decision; resuming the source copy", "error", err)
	if rerr := s.cfg.Local.Resume(tree); rerr != nil {
		log.Error("resuming the source copy failed", "error", rerr)
	}
	rec.State, rec.Phase = StateAborted, PhaseCommit.String()
	rec.Error = joinErr(rec.Error, "the destination lost its copy before the commit reached it; the source copy resumed")
	if jerr := s.cfg.Journal.Put(rec); jerr != nil {
		log.Error("journal write failed", "error", jerr)
	}
	m.setState(StateAborted)
	s.cfg.Local.Cleanup(m.ID)
	advice := "the destination lost its restored copy (for instance in a reboot) before the commit reached it; the process runs on the source again — retry the move"
	return Outcome{
		Moved: false, FailedPhase: PhaseCommit, ProcessLocation: "source", Advice: advice,
		Err: &PhaseError{ID: m.ID, Phase: PhaseCommit, Err: err, Location: "source", Advice: advice},
	}
}

func (m *Migration) canceledNow() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.canceled
}

func rate(b uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(b) / d.Seconds()
}

func (s *Source) precopyRound(ctx context.Context, peer Peer, pc Precopy, id string) (RoundStats, error) {
	stream, err := peer.OpenPages(ctx, id, pagexfer.BatchPrecopy)
	if err != nil {
		return RoundStats{}, err
	}
	st, err := pc.Round(ctx, stream)
	cerr := stream.CloseAndWait(ctx)
	if err != nil {
		return st, err
	}
	return st, cerr
}

func (s *Source) finalDump(ctx context.Context, peer Peer, m *Migration, tree Tree, req MoveRequest) (DumpResult, error) {
	stream, err := peer.OpenPages(ctx, m.ID, pagexfer.BatchFinal)
	if err != nil {
		return DumpResult{}, err
	}
	res, err := s.cfg.Local.Dump(ctx, DumpRequest{ID: m.ID, Tree: tree, Pages: stream, Compression: req.Compression, BandwidthLimit: req.BandwidthLimit, TCPEstablished: req.TCPEstablished, ShellJob: req.ShellJob})
	if err != nil {
		_ = stream.CloseAndWait(ctx)
		return res, err
	}
	if err := stream.CloseAndWait(ctx); err != nil {
		// The dump succeeded, so the tree is frozen: resume it here since
		// the caller only resumes trees it knows are frozen.
		if rerr := s.cfg.Local.Resume(tree); rerr != nil {
			s.log.Error("resume after a failed page stream", "error", rerr)
		}
		return res, fmt.Errorf("final page stream: %w", err)
	}
	return res, nil
}

// abort tells the destination to discard the migration, once; the caller
// leaves further attempts to a background resend.
func (s *Source) abort(peer Peer, id, reason string, log hclog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := peer.Abort(ctx, id, reason)
	if err != nil {
		log.Warn("destination did not acknowledge the abort; re-sending in the background", "error", err)
	}
	return err
}

// sendCommit re-sends the commit until the destination acknowledges it or
// CommitRetry passes.
func (s *Source) sendCommit(peer Peer, id string, log hclog.Logger) (int, error) {
	deadline := time.Now().Add(s.cfg.CommitRetry)
	backoff := 100 * time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		pid, err := peer.Commit(ctx, id)
		cancel()
		if err == nil || errors.Is(err, ErrDiscarded) {
			return pid, err
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("destination did not acknowledge the commit: %w", err)
		}
		log.Warn("commit not acknowledged; retrying", "error", err, "backoff", backoff)
		time.Sleep(backoff)
		backoff = min(backoff*2, 5*time.Second)
	}
}

func adviceFor(ph Phase, err error) string {
	switch {
	case errors.Is(err, ErrPreflight):
		return "fix the problems listed and retry; nothing was changed"
	case errors.Is(err, ErrCanceled), errors.Is(err, context.Canceled):
		return "nothing to do"
	case ph == PhasePrepare:
		return "nothing was changed; check that the destination agent runs and is reachable, then retry"
	}
	return "nothing to do; the destination was cleaned up — see the agent logs for details, then retry"
}
