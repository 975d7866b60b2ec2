package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/migrated/migrated/pkg/pagexfer"
)

// fakeLocal is the source host of the engine's unit tests: a tree that is
// "running", "frozen" or "killed".
type fakeLocal struct {
	mu        sync.Mutex
	state     string // running, frozen, killed
	exists    bool
	rounds    []RoundStats
	round     int
	dumpErr   error
	dir       string
	cleaned   []string
	onRound   func(n int)
	roundWait chan struct{}
}

func (f *fakeLocal) Capabilities(context.Context) (Capabilities, error) {
	return Capabilities{CRIUVersion: "4.2.1", PageServerHeaderSize: 32}, nil
}
func (f *fakeLocal) CPUInfo(context.Context) ([]byte, error) { return []byte("cpu"), nil }
func (f *fakeLocal) Inspect(_ context.Context, pid int) (Tree, error) {
	if !f.exists {
		return Tree{}, fmt.Errorf("%w: pid %d", ErrNoProcess, pid)
	}
	return Tree{PIDs: []int{pid, pid + 1}, MemoryBytes: 10 << 20}, nil
}
func (f *fakeLocal) Alive(Tree) bool { return f.exists }
func (f *fakeLocal) NewPrecopy(context.Context, string, Tree, Capabilities, pagexfer.Compression, int64) (Precopy, error) {
	return &fakePrecopy{f: f}, nil
}

type fakePrecopy struct{ f *fakeLocal }

func (p *fakePrecopy) Round(ctx context.Context, s PageStream) (RoundStats, error) {
	f := p.f
	f.mu.Lock()
	n := f.round
	f.round++
	hook := f.onRound
	f.mu.Unlock()
	if hook != nil {
		hook(n + 1)
	}
	if f.roundWait != nil {
		select {
		case <-f.roundWait:
		case <-ctx.Done():
			return RoundStats{}, ctx.Err()
		}
	}
	if err := s.SendBatch(ctx, &pagexfer.Batch{Kind: pagexfer.BatchPrecopy}); err != nil {
		return RoundStats{}, err
	}
	if n < len(f.rounds) {
		return f.rounds[n], nil
	}
	return f.rounds[len(f.rounds)-1], nil
}
func (p *fakePrecopy) Close() error { return nil }

func (f *fakeLocal) Dump(ctx context.Context, req DumpRequest) (DumpResult, error) {
	if f.dumpErr != nil {
		return DumpResult{}, f.dumpErr
	}
	f.mu.Lock()
	f.state = "frozen"
	f.mu.Unlock()
	if err := req.Pages.SendBatch(ctx, &pagexfer.Batch{Kind: pagexfer.BatchFinal, Last: true}); err != nil {
		return DumpResult{}, err
	}
	if err := os.WriteFile(filepath.Join(f.dir, "core-1.img"), []byte("core"), 0o600); err != nil {
		return DumpResult{}, err
	}
	return DumpResult{ImagesDir: f.dir, Files: []string{"core-1.img"}, FrozenAt: time.Now(),
		Pages: pagexfer.Counters{PagesSent: 10, PagesReferenced: 90}}, nil
}
func (f *fakeLocal) Resume(Tree) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = "running"
	return nil
}
func (f *fakeLocal) Kill(Tree) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = "killed"
	return nil
}
func (f *fakeLocal) Cleanup(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleaned = append(f.cleaned, id)
}
func (f *fakeLocal) State() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state
}

// fakeDestLocal is the destination host: restores "succeed" unless told
// otherwise.
type fakeDestLocal struct {
	mu         sync.Mutex
	root       string
	restoreErr error
	pidsUsed   []int
	state      string // "", stopped, running, killed
	criuErr    error
	dead       bool // the restored tree is gone (a reboot)
}

func (d *fakeDestLocal) Capabilities(context.Context) (Capabilities, error) {
	if d.criuErr != nil {
		return Capabilities{}, d.criuErr
	}
	return Capabilities{CRIUVersion: "4.2.1", PageServerHeaderSize: 32}, nil
}
func (d *fakeDestLocal) CheckCPU(context.Context, []byte) error { return nil }
func (d *fakeDestLocal) PIDsInUse([]int) []int                  { return d.pidsUsed }
func (d *fakeDestLocal) FileProblems([]FileRef) []string        { return nil }
func (d *fakeDestLocal) WorkDir(id string) (string, error) {
	dir := filepath.Join(d.root, id)
	return dir, os.MkdirAll(dir, 0o700)
}
func (d *fakeDestLocal) NewReceiver(context.Context, string, string, int) (PageReceiver, error) {
	return &fakeReceiver{}, nil
}
func (d *fakeDestLocal) Restore(_ context.Context, _ string, dir string, _ RestoreOptions) (RestoredTree, error) {
	if d.restoreErr != nil {
		return RestoredTree{}, d.restoreErr
	}
	if _, err := os.Stat(filepath.Join(dir, "core-1.img")); err != nil {
		return RestoredTree{}, fmt.Errorf("image missing: %w", err)
	}
	d.mu.Lock()
	d.state = "stopped"
	d.mu.Unlock()
	return RestoredTree{PID: 42, PIDs: []int{42, 43}}, nil
}
func (d *fakeDestLocal) Resume(RestoredTree) error { d.set("running"); return nil }
func (d *fakeDestLocal) Kill(RestoredTree) error   { d.set("killed"); return nil }
func (d *fakeDestLocal) Alive(RestoredTree) bool   { return !d.dead }
func (d *fakeDestLocal) Cleanup(id string)         { os.RemoveAll(filepath.Join(d.root, id)) }
func (d *fakeDestLocal) set(s string) {
	d.mu.Lock()
	d.state = s
	d.mu.Unlock()
}
func (d *fakeDestLocal) State() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state
}

type fakeReceiver struct{}

func (fakeReceiver) HandleBatch(context.Context, *pagexfer.Batch) error { return nil }
func (fakeReceiver) FinishFinal(context.Context) error                  { return nil }
func (fakeReceiver) Close() error                                       { return nil }

// localPeer calls a Destination in-process.
type localPeer struct {
	d         *Destination
	commitErr int    // fail this many commits first
	onCommit  func() // called at every commit attempt
}

type localStream struct {
	d  *Destination
	id string
}

func (s localStream) SendBatch(ctx context.Context, b *pagexfer.Batch) error {
	return s.d.HandleBatch(ctx, s.id, b)
}
func (s localStream) CloseAndWait(context.Context) error { return nil }

func (p *localPeer) Prepare(ctx context.Context, r PrepareRequest) (PrepareResult, error) {
	return p.d.Prepare(ctx, r)
}
func (p *localPeer) OpenPages(_ context.Context, id string, _ pagexfer.BatchKind) (PageStream, error) {
	return localStream{p.d, id}, nil
}
func (p *localPeer) SendImages(ctx context.Context, id, dir string, files []string) error {
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return err
		}
		sum := sha256sum(b)
		if err := p.d.ImageChunk(ctx, id, f, 0, b, true, sum); err != nil {
			return err
		}
	}
	return nil
}
func (p *localPeer) Restore(ctx context.Context, id string) (int, error) {
	t, err := p.d.Restore(ctx, id)
	return t.PID, err
}
func (p *localPeer) Commit(ctx context.Context, id string) (int, error) {
	if p.onCommit != nil {
		p.onCommit()
	}
	if p.commitErr > 0 {
		p.commitErr--
		return 0, errors.New("link down")
	}
	return p.d.Commit(ctx, id)
}
func (p *localPeer) Abort(ctx context.Context, id, reason string) error {
	return p.d.Abort(ctx, id, reason)
}
func (p *localPeer) Status(_ context.Context, id string) (PeerState, error) {
	return p.d.Status(id), nil
}
func (p *localPeer) Close() error { return nil }

type engineBed struct {
	src  *fakeLocal
	dst  *fakeDestLocal
	peer *localPeer
	s    *Source
	d    *Destination
	srcJ *Journal
	dstJ *Journal
}

func newEngineBed(t *testing.T) *engineBed {
	t.Helper()
	root := t.TempDir()
	srcJ, _ := OpenJournal(filepath.Join(root, "src-journal"))
	dstJ, _ := OpenJournal(filepath.Join(root, "dst-journal"))
	imgs := filepath.Join(root, "src-images")
	os.MkdirAll(imgs, 0o700)
	b := &engineBed{
		src:  &fakeLocal{state: "running", exists: true, dir: imgs, rounds: []RoundStats{{PagesScanned: 25600, PagesChanged: 25600, BytesRaw: 100 << 20, Duration: time.Second}, {PagesScanned: 25600, PagesChanged: 10, BytesRaw: 40960, Duration: 10 * time.Millisecond}}},
		dst:  &fakeDestLocal{root: filepath.Join(root, "dst-work")},
		srcJ: srcJ, dstJ: dstJ,
	}
	b.d = NewDestination(DestConfig{Local: b.dst, Journal: dstJ})
	b.peer = &localPeer{d: b.d}
	b.s = NewSource(SourceConfig{Local: b.src, Journal: srcJ, CommitRetry: 5 * time.Second,
		Dial: func(context.Context, string) (Peer, error) { return b.peer, nil }})
	t.Cleanup(b.s.Close)
	return b
}

func (b *engineBed) move(t *testing.T, req MoveRequest) (*Migration, Outcome) {
	t.Helper()
	if req.PID == 0 {
		req.PID = 1000
	}
	req.Destination = "hostB"
	m, err := b.s.Move(req)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("migration did not end")
	}
	return m, *m.Outcome()
}

func TestEngineMovesAndCommits(t *testing.T) {
	b := newEngineBed(t)
	m, out := b.move(t, MoveRequest{Mode: ModePrecopy})
	if !out.Moved || out.DestPID != 42 || out.Rounds != 2 {
		t.Fatalf("outcome = %+v", out)
	}
	if !strings.HasPrefix(out.PrecopyStopReason, string(StopConverged)) {
		t.Fatalf("pre-copy stop reason %q", out.PrecopyStopReason)
	}
	if b.src.State() != "killed" || b.dst.State() != "running" {
		t.Fatalf("source %s, destination %s; want killed, running", b.src.State(), b.dst.State())
	}
	rec, err := b.srcJ.Get(m.ID)
	if err != nil || rec.State != StateDone {
		t.Fatalf("source journal: %+v %v", rec, err)
	}
	if st := b.d.Status(m.ID); st.State != DestCommitted {
		t.Fatalf("destination state %s", st.State)
	}
	var phases []Phase
	_ = m.Watch(context.Background(), func(e Event) error { phases = append(phases, e.Phase); return nil })
	if phases[len(phases)-1] != PhaseDone {
		t.Fatalf("last phase %v", phases[len(phases)-1])
	}
}

func TestEngineStopCopyHasNoRounds(t *testing.T) {
	b := newEngineBed(t)
	_, out := b.move(t, MoveRequest{Mode: ModeStopCopy})
	if !out.Moved || out.Rounds != 0 {
		t.Fatalf("outcome = %+v", out)
	}
}

func TestEngineFailuresBeforeCommitResumeSource(t *testing.T) {
	tests := []struct {
		name  string
		setup func(b *engineBed)
		phase Phase
		want  string
	}{
		{"restore fails", func(b *engineBed) { b.dst.restoreErr = errors.New("criu restore: pid taken") }, PhaseRestore, "pid taken"},
		{"dump fails", func(b *engineBed) { b.src.dumpErr = errors.New("criu dump: connected TCP socket") }, PhaseDump, "connected TCP socket"},
		{"pid used on destination", func(b *engineBed) { b.dst.pidsUsed = []int{1000} }, PhasePrepare, "already in use on the destination"},
		{"criu missing on destination", func(b *engineBed) { b.dst.criuErr = errors.New("criu not found") }, PhasePrepare, "CRIU unusable on the destination"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newEngineBed(t)
			tt.setup(b)
			m, out := b.move(t, MoveRequest{})
			if out.Moved {
				t.Fatal("moved despite the fault")
			}
			if out.FailedPhase != tt.phase || out.ProcessLocation != "source" {
				t.Fatalf("failed phase %v location %q, want %v source", out.FailedPhase, out.ProcessLocation, tt.phase)
			}
			if !strings.Contains(out.Err.Error(), tt.want) || !strings.Contains(out.Err.Error(), "runs on the source") {
				t.Fatalf("error %q does not say what happened and where the process is", out.Err)
			}
			if b.src.State() != "running" {
				t.Fatalf("source copy %s, want running", b.src.State())
			}
			if st := b.dst.State(); st == "running" || st == "stopped" {
				t.Fatalf("destination copy %s after a failure", st)
			}
			if ents, _ := os.ReadDir(b.dst.root); len(ents) != 0 {
				t.Fatalf("destination work dirs left: %d", len(ents))
			}
			if rec, _ := b.srcJ.Get(m.ID); !rec.Terminal() {
				t.Fatalf("source journal record not terminal: %+v", rec)
			}
		})
	}
}

func TestEngineMissingProcess(t *testing.T) {
	b := newEngineBed(t)
	b.src.exists = false
	_, out := b.move(t, MoveRequest{})
	if out.Moved || !errors.Is(out.Err, ErrNoProcess) || out.ProcessLocation != "nowhere" {
		t.Fatalf("outcome = %+v", out)
	}
}

func TestEngineCancelDuringPrecopy(t *testing.T) {
	b := newEngineBed(t)
	b.src.roundWait = make(chan struct{})
	started := make(chan struct{}, 10)
	b.src.onRound = func(int) { started <- struct{}{} }
	m, err := b.s.Move(MoveRequest{PID: 1000, Destination: "hostB"})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if err := b.s.Cancel(m.ID); err != nil {
		t.Fatal(err)
	}
	<-m.Done()
	out := m.Outcome()
	if out.Moved || !errors.Is(out.Err, ErrCanceled) || out.ProcessLocation != "source" {
		t.Fatalf("outcome = %+v", out)
	}
	if b.src.State() != "running" || b.d.Status(m.ID).State != DestAborted {
		t.Fatalf("source %s, destination %s", b.src.State(), b.d.Status(m.ID).State)
	}
	if err := b.s.Cancel(m.ID); !errors.Is(err, ErrBadState) {
		t.Fatalf("second cancel: %v", err)
	}
}

func TestEngineCommitRetried(t *testing.T) {
	b := newEngineBed(t)
	b.peer.commitErr = 2
	_, out := b.move(t, MoveRequest{Mode: ModeStopCopy})
	if !out.Moved || b.dst.State() != "running" {
		t.Fatalf("outcome %+v, destination %s", out, b.dst.State())
	}
}

// TestEngineKeepsFrozenSourceUntilAck checks the order of the commit: the
// frozen source copy exists at every commit attempt, and goes only after
// the destination acknowledged.
func TestEngineKeepsFrozenSourceUntilAck(t *testing.T) {
	b := newEngineBed(t)
	b.peer.commitErr = 2
	var seen []string
	b.peer.onCommit = func() { seen = append(seen, b.src.State()) }
	_, out := b.move(t, MoveRequest{Mode: ModeStopCopy})
	if !out.Moved {
		t.Fatalf("outcome %+v", out)
	}
	if want := []string{"frozen", "frozen", "frozen"}; strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Fatalf("source copy at the commit attempts: %v, want %v", seen, want)
	}
	if b.src.State() != "killed" || b.dst.State() != "running" {
		t.Fatalf("source %s, destination %s; want killed, running", b.src.State(), b.dst.State())
	}
}

// TestEngineDestinationLostCopy: the destination restarts after the commit
// decision and finds its restored copy gone (as after a reboot); it answers
// the commit with ErrDiscarded and the source's frozen copy resumes.
func TestEngineDestinationLostCopy(t *testing.T) {
	b := newEngineBed(t)
	b.peer.onCommit = func() {
		if b.peer.d != b.d {
			return
		}
		b.dst.dead = true
		b.peer.d = NewDestination(DestConfig{Local: b.dst, Journal: b.dstJ})
		if kept, _ := b.peer.d.Recover(); len(kept) != 0 {
			t.Errorf("the restarted destination kept %d migrations of a lost tree", len(kept))
		}
	}
	m, out := b.move(t, MoveRequest{Mode: ModeStopCopy})
	if out.Moved || out.ProcessLocation != "source" || !errors.Is(out.Err, ErrDiscarded) {
		t.Fatalf("outcome %+v", out)
	}
	if b.src.State() != "running" {
		t.Fatalf("source copy %s, want running", b.src.State())
	}
	if rec, err := b.srcJ.Get(m.ID); err != nil || rec.State != StateAborted {
		t.Fatalf("source journal: %+v %v", rec, err)
	}
	// Recovery takes the same way: a decided commit whose destination lost
	// its copy ends with the source copy running.
	b.src.Kill(Tree{})
	b.src.state = "frozen"
	rec, _ := b.srcJ.Get(m.ID)
	rec.State = StateDecidedCommit
	if err := b.srcJ.Put(rec); err != nil {
		t.Fatal(err)
	}
	s2 := NewSource(SourceConfig{Local: b.src, Journal: b.srcJ, Dial: func(context.Context, string) (Peer, error) { return b.peer, nil }})
	defer s2.Close()
	if todo := s2.Recover(); len(todo) != 1 {
		t.Fatalf("recovery took up %d records", len(todo))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if rec, _ := b.srcJ.Get(m.ID); rec.State == StateAborted && b.src.State() == "running" {
			break
		}
		if time.Now().After(deadline) {
			rec, _ := b.srcJ.Get(m.ID)
			t.Fatalf("recovery: record %s, source copy %s", rec.State, b.src.State())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDestinationRefusesBadInput(t *testing.T) {
	b := newEngineBed(t)
	ctx := context.Background()
	if _, err := b.d.Prepare(ctx, PrepareRequest{ID: "m1", PIDs: []int{5}}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"../etc/passwd", "a/b", "..", ".hidden", "", "x\x00y"} {
		if err := b.d.ImageChunk(ctx, "m1", name, 0, []byte("x"), true, sha256sum([]byte("x"))); !errors.Is(err, ErrBadState) {
			t.Errorf("image name %q: %v", name, err)
		}
	}
	if err := b.d.ImageChunk(ctx, "m1", "core.img", 0, []byte("x"), true, []byte("wrong")); err == nil {
		t.Error("image with a wrong checksum accepted")
	}
	if _, err := b.d.Restore(ctx, "m1"); !errors.Is(err, ErrBadState) {
		t.Errorf("restore before any page stream: %v", err)
	}
	if _, err := b.d.Commit(ctx, "m1"); !errors.Is(err, ErrBadState) {
		t.Errorf("commit before restore: %v", err)
	}
	if _, err := b.d.Restore(ctx, "nope"); !errors.Is(err, ErrUnknownMigration) {
		t.Errorf("restore of an unknown migration: %v", err)
	}
	if err := b.d.HandleBatch(ctx, "../x", &pagexfer.Batch{}); !errors.Is(err, ErrBadID) {
		t.Errorf("batch with a bad id: %v", err)
	}
	// An id this host's journal already holds (here: a migration it runs
	// as the source) is not taken by a peer: its record would be replaced.
	if err := b.dstJ.Put(Record{ID: "m-mine", Role: "source", PID: 7, State: StateFrozen, Started: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.d.Prepare(ctx, PrepareRequest{ID: "m-mine", PIDs: []int{5}}); !errors.Is(err, ErrExists) {
		t.Errorf("prepare with an id of this host's journal: %v", err)
	}
	if r, err := b.dstJ.Get("m-mine"); err != nil || r.Role != "source" || r.State != StateFrozen {
		t.Errorf("the source record was touched: %+v %v", r, err)
	}
}
