package phaul

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/migrated/migrated/pkg/pagexfer"
)

// PageReceiver takes one migration's page batches on the destination:
// pre-copy batches fill its store, the final stream is replayed into the
// local CRIU page server as it arrives.
type PageReceiver interface {
	HandleBatch(ctx context.Context, b *pagexfer.Batch) error
	// FinishFinal waits until the final stream's pages are written into
	// the images directory (CRIU's page server has exited).
	FinishFinal(ctx context.Context) error
	// Close releases the store and stops a page server still running.
	Close() error
}

// RestoredTree is a tree restored on the destination, left stopped.
type RestoredTree struct {
	PID  int   // root PID
	PIDs []int // every task
	// Identity of the restored tasks; unknown while the restore runs.
	Identity Identity
}

// DestLocal is the destination host: CRIU and pagexfer on the machine the
// process moves to.
type DestLocal interface {
	Capabilities(ctx context.Context) (Capabilities, error)
	// CheckCPU runs `criu cpuinfo check` against the source's dump.
	CheckCPU(ctx context.Context, cpuinfo []byte) error
	// PIDsInUse returns those of pids that exist on this host.
	PIDsInUse(pids []int) []int
	// FileProblems reports files missing here or of another size.
	FileProblems(files []FileRef) []string
	// WorkDir creates the migration's work directory and returns it.
	WorkDir(id string) (string, error)
	// NewReceiver creates the page store and replay for a migration.
	NewReceiver(ctx context.Context, id, workDir string, hdrSize int) (PageReceiver, error)
	// Restore restores the tree from imagesDir, left stopped.
	Restore(ctx context.Context, id, imagesDir string, opts RestoreOptions) (RestoredTree, error)
	// Resume lets a restored tree run. Resume and Kill signal only the
	// tasks that match the tree's Identity when it is known.
	Resume(t RestoredTree) error
	// Kill removes a restored, stopped tree.
	Kill(t RestoredTree) error
	// Alive reports whether the tree's root exists and is the restored
	// process: the same Identity when it is known, otherwise stopped (a
	// tree whose restore was under way is left stopped by CRIU).
	Alive(t RestoredTree) bool
	// Cleanup removes the migration's work directory.
	Cleanup(id string)
}

// RestoreOptions carries the source's dump options the restore must match.
type RestoreOptions struct {
	TCPEstablished bool
	ShellJob       bool
}

// DestConfig wires a Destination.
type DestConfig struct {
	Local   DestLocal
	Journal *Journal
	Logger  hclog.Logger
	// MaxConcurrent bounds migrations in flight to this host (default 4).
	MaxConcurrent int
	// MaxImageBytes bounds the total size of one migration's non-memory
	// images (default 1 GiB).
	MaxImageBytes int64
	Hooks         Hooks
}

// Destination answers the Peer API: it prepares, receives, restores and,
// on the source's decision, resumes or discards. It never resumes a tree
// on its own and never discards a restored tree except on Abort.
type Destination struct {
	cfg DestConfig
	log hclog.Logger

	mu   sync.Mutex
	migs map[string]*destMigration

	// cleanups are work-directory removals after a commit, which the
	// source need not wait for; Close waits for them.
	cleanups sync.WaitGroup
}

type destMigration struct {
	mu       sync.Mutex
	rec      Record
	req      PrepareRequest
	workDir  string
	images   string
	recv     PageReceiver
	finalEnd bool
	imgFile  *os.File
	imgName  string
	imgHash  hash.Hash
	imgBytes int64
	tree     RestoredTree
	restored bool
}

// NewDestination returns a Destination.
func NewDestination(cfg DestConfig) *Destination {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.MaxConcurrent == 0 {
		cfg.MaxConcurrent = 4
	}
	if cfg.MaxImageBytes == 0 {
		cfg.MaxImageBytes = 1 << 30
	}
	return &Destination{cfg: cfg, log: cfg.Logger, migs: map[string]*destMigration{}}
}

func (d *Destination) get(id string) (*destMigration, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("%w: %q", ErrBadID, id)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	m, ok := d.migs[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownMigration, id)
	}
	return m, nil
}

func (d *Destination) hook(ctx context.Context, point string) error {
	if d.cfg.Hooks == nil {
		return nil
	}
	return d.cfg.Hooks.At(ctx, point)
}

// Prepare checks that this host can take the tree. Unless req.CheckOnly it
// reserves a work area; repeating it for the same id returns the same
// answer.
func (d *Destination) Prepare(ctx context.Context, req PrepareRequest) (PrepareResult, error) {
	if !req.CheckOnly && !ValidID(req.ID) {
		return PrepareResult{}, fmt.Errorf("%w: %q", ErrBadID, req.ID)
	}
	if len(req.PIDs) == 0 || len(req.PIDs) > 65536 {
		return PrepareResult{}, fmt.Errorf("%w: %d pids", ErrBadState, len(req.PIDs))
	}
	if !req.CheckOnly {
		d.mu.Lock()
		if _, ok := d.migs[req.ID]; ok {
			d.mu.Unlock()
			caps, _ := d.cfg.Local.Capabilities(ctx)
			return PrepareResult{OK: true, Destination: caps}, nil
		}
		// Finished migrations are forgotten: every one left is in flight.
		active := len(d.migs)
		d.mu.Unlock()
		// One journal record per id on a host: an id the journal knows
		// (a migration this host runs as the source, or one it finished)
		// is not taken again.
		if _, err := d.cfg.Journal.Get(req.ID); err == nil {
			return PrepareResult{}, fmt.Errorf("%w: migration id %s is already in this host's journal", ErrExists, req.ID)
		}
		if active >= d.cfg.MaxConcurrent {
			return PrepareResult{}, fmt.Errorf("%w: %d in flight", ErrBusy, active)
		}
	}
	var problems []string
	caps, err := d.cfg.Local.Capabilities(ctx)
	if err != nil {
		problems = append(problems, "CRIU unusable on the destination: "+err.Error())
	} else {
		if req.Source.PageServerHeaderSize != 0 && caps.PageServerHeaderSize != req.Source.PageServerHeaderSize {
			problems = append(problems, fmt.Sprintf("CRIU page-server protocol differs: source CRIU %s (%d-byte headers), destination CRIU %s (%d-byte headers)",
				req.Source.CRIUVersion, req.Source.PageServerHeaderSize, caps.CRIUVersion, caps.PageServerHeaderSize))
		}
		if len(req.CPUInfo) > 0 {
			if err := d.cfg.Local.CheckCPU(ctx, req.CPUInfo); err != nil {
				problems = append(problems, "CPU of the destination is not compatible: "+err.Error())
			}
		}
	}
	if used := d.cfg.Local.PIDsInUse(req.PIDs); len(used) > 0 {
		problems = append(problems, fmt.Sprintf("PID(s) %v already in use on the destination", used))
	}
	problems = append(problems, d.cfg.Local.FileProblems(req.Files)...)
	res := PrepareResult{OK: len(problems) == 0, Problems: problems, Destination: caps}
	if !res.OK || req.CheckOnly {
		return res, nil
	}
	if err := d.hook(ctx, "dest-prepare"); err != nil {
		return PrepareResult{}, err
	}
	dir, err := d.cfg.Local.WorkDir(req.ID)
	if err != nil {
		return PrepareResult{}, fmt.Errorf("work dir: %w", err)
	}
	images := filepath.Join(dir, "images")
	if err := os.MkdirAll(images, 0o700); err != nil {
		d.cfg.Local.Cleanup(req.ID)
		return PrepareResult{}, err
	}
	recv, err := d.cfg.Local.NewReceiver(ctx, req.ID, dir, caps.PageServerHeaderSize)
	if err != nil {
		d.cfg.Local.Cleanup(req.ID)
		return PrepareResult{}, err
	}
	m := &destMigration{
		rec:     Record{ID: req.ID, Role: "destination", PID: req.PIDs[0], PIDs: req.PIDs, Peer: req.Peer, State: DestPrepared, Started: time.Now()},
		req:     req,
		workDir: dir,
		images:  images,
		recv:    recv,
	}
	if err := d.cfg.Journal.Put(m.rec); err != nil {
		recv.Close()
		d.cfg.Local.Cleanup(req.ID)
		return PrepareResult{}, err
	}
	d.mu.Lock()
	d.migs[req.ID] = m
	d.mu.Unlock()
	d.log.Info("migration prepared", "migration_id", req.ID, "pids", req.PIDs)
	return res, nil
}

// HandleBatch takes one page batch of migration id.
func (d *Destination) HandleBatch(ctx context.Context, id string, b *pagexfer.Batch) error {
	m, err := d.get(id)
	if err != nil {
		return err
	}
	m.mu.Lock()
	st, recv := m.rec.State, m.recv
	m.mu.Unlock()
	if (st != DestPrepared && st != DestReceiving) || recv == nil {
		return fmt.Errorf("%w: page batch in state %s", ErrBadState, st)
	}
	if st == DestPrepared {
		m.mu.Lock()
		m.rec.State = DestReceiving
		m.mu.Unlock()
	}
	point := "dest-pages"
	if b.Kind == pagexfer.BatchFinal {
		point = "dest-final"
	}
	if err := d.hook(ctx, point); err != nil {
		return err
	}
	if err := recv.HandleBatch(ctx, b); err != nil {
		return err
	}
	if b.Kind == pagexfer.BatchFinal && b.Last {
		m.mu.Lock()
		m.finalEnd = true
		m.mu.Unlock()
	}
	return nil
}

// maxImageFiles bounds the number of image files of one migration.
const maxImageFiles = 4096

// ImageChunk writes part of one image file. Files arrive one after
// another; the last chunk carries the file's SHA-256.
func (d *Destination) ImageChunk(ctx context.Context, id, name string, offset uint64, data []byte, last bool, sum []byte) error {
	m, err := d.get(id)
	if err != nil {
		return err
	}
	if err := validImageName(name); err != nil {
		return err
	}
	if err := d.hook(ctx, "dest-images"); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rec.State != DestPrepared && m.rec.State != DestReceiving {
		return fmt.Errorf("%w: image in state %s", ErrBadState, m.rec.State)
	}
	if m.imgFile == nil || m.imgName != name {
		if m.imgFile != nil {
			m.imgFile.Close()
			m.imgFile = nil
			return fmt.Errorf("%w: image %s started before %s ended", ErrBadState, name, m.imgName)
		}
		if offset != 0 {
			return fmt.Errorf("%w: image %s starts at offset %d", ErrBadState, name, offset)
		}
		ents, _ := os.ReadDir(m.images)
		if len(ents) >= maxImageFiles {
			return fmt.Errorf("%w: more than %d image files", ErrBadState, maxImageFiles)
		}
		f, err := os.OpenFile(filepath.Join(m.images, name), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("image %s: %w", name, err)
		}
		m.imgFile, m.imgName, m.imgHash = f, name, sha256.New()
	}
	pos, _ := m.imgFile.Seek(0, 1)
	if uint64(pos) != offset {
		return fmt.Errorf("%w: image %s chunk at offset %d, expected %d", ErrBadState, name, offset, pos)
	}
	m.imgBytes += int64(len(data))
	if m.imgBytes > d.cfg.MaxImageBytes {
		return fmt.Errorf("%w: images exceed %d bytes", ErrBadState, d.cfg.MaxImageBytes)
	}
	if _, err := m.imgFile.Write(data); err != nil {
		return fmt.Errorf("image %s: %w", name, err)
	}
	m.imgHash.Write(data)
	if last {
		got := m.imgHash.Sum(nil)
		err := m.imgFile.Close()
		m.imgFile = nil
		if err != nil {
			return fmt.Errorf("image %s: %w", name, err)
		}
		if string(got) != string(sum) {
			return fmt.Errorf("%w: image %s checksum mismatch", ErrBadState, name)
		}
	}
	return nil
}

// validImageName accepts a plain file name: no directories, no dot names.
func validImageName(name string) error {
	if name == "" || len(name) > 255 || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") {
		return fmt.Errorf("%w: image name %q", ErrBadState, name)
	}
	return nil
}

// Restore restores the tree left stopped. Repeating it returns the same
// tree.
func (d *Destination) Restore(ctx context.Context, id string) (RestoredTree, error) {
	m, err := d.get(id)
	if err != nil {
		return RestoredTree{}, err
	}
	m.mu.Lock()
	switch {
	case m.restored:
		t := m.tree
		m.mu.Unlock()
		return t, nil
	case m.rec.State != DestReceiving:
		st := m.rec.State
		m.mu.Unlock()
		return RestoredTree{}, fmt.Errorf("%w: restore in state %s", ErrBadState, st)
	case !m.finalEnd:
		m.mu.Unlock()
		return RestoredTree{}, fmt.Errorf("%w: restore before the final page stream ended", ErrBadState)
	case m.imgFile != nil:
		m.mu.Unlock()
		return RestoredTree{}, fmt.Errorf("%w: restore while image %s is incomplete", ErrBadState, m.imgName)
	}
	m.rec.State = DestRestoring
	m.rec.DestPID = m.req.PIDs[0]
	rec := m.rec
	m.mu.Unlock()
	log := d.log.With("migration_id", id)
	// A crash from here on may leave a restored, stopped tree: recovery
	// finds it through this record and keeps it for the source's decision.
	if err := d.cfg.Journal.Put(rec); err != nil {
		log.Error("journal write failed", "error", err)
	}

	fail := func(err error) (RestoredTree, error) {
		m.mu.Lock()
		m.rec.State = DestAborted
		m.rec.Error = err.Error()
		m.mu.Unlock()
		d.discard(m)
		log.Warn("restore failed; migration discarded", "error", err)
		return RestoredTree{}, err
	}
	start := time.Now()
	if err := m.recv.FinishFinal(ctx); err != nil {
		return fail(fmt.Errorf("writing pages: %w", err))
	}
	// The images are complete and the page store is needed no more: its
	// memory, as large as the pre-copied workload, goes back before CRIU
	// restores the tree into memory of its own.
	m.mu.Lock()
	recv := m.recv
	m.recv = nil
	m.mu.Unlock()
	released := time.Now()
	if err := recv.Close(); err != nil {
		log.Warn("closing the page store", "error", err)
	}
	log.Debug("page store released", "took", time.Since(released))
	pagesDone := time.Now()
	if err := d.hook(ctx, "dest-restore"); err != nil {
		return fail(err)
	}
	if used := d.cfg.Local.PIDsInUse(m.req.PIDs); len(used) > 0 {
		return fail(fmt.Errorf("PID(s) %v were taken on the destination after the preflight", used))
	}
	t, err := d.cfg.Local.Restore(ctx, id, m.images, RestoreOptions{TCPEstablished: m.req.TCPEstablished, ShellJob: m.req.ShellJob})
	if err != nil {
		return fail(err)
	}
	m.mu.Lock()
	m.tree, m.restored = t, true
	m.rec.State = DestRestored
	m.rec.DestPID = t.PID
	m.rec.PIDs = t.PIDs
	m.rec.Identity = t.Identity
	rec = m.rec
	m.mu.Unlock()
	if err := d.cfg.Journal.Put(rec); err != nil {
		log.Error("journal write failed", "error", err)
	}
	log.Info("restored, stopped, waiting for the decision", "pid", t.PID,
		"pages_wait", pagesDone.Sub(start), "criu_restore", time.Since(pagesDone))
	if err := d.hook(ctx, "dest-restored"); err != nil {
		return RestoredTree{}, err
	}
	return t, nil
}

// Commit resumes the restored tree. Repeating it is harmless.
func (d *Destination) Commit(ctx context.Context, id string) (int, error) {
	m, err := d.get(id)
	if err != nil {
		// Committed migrations stay known through the journal.
		if r, jerr := d.cfg.Journal.Get(id); jerr == nil {
			switch r.State {
			case DestCommitted:
				return r.DestPID, nil
			case DestAborted:
				return 0, fmt.Errorf("%w: migration %s was discarded here (%s)", ErrDiscarded, id, r.Error)
			}
		}
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	switch m.rec.State {
	case DestCommitted:
		return m.tree.PID, nil
	case DestAborted:
		return 0, fmt.Errorf("%w: migration %s was discarded here (%s)", ErrDiscarded, id, m.rec.Error)
	case DestRestored:
	default:
		return 0, fmt.Errorf("%w: commit in state %s", ErrBadState, m.rec.State)
	}
	if err := d.hook(ctx, "dest-commit"); err != nil {
		return 0, err
	}
	if err := d.cfg.Local.Resume(m.tree); err != nil {
		return 0, fmt.Errorf("resuming pid %d: %w", m.tree.PID, err)
	}
	if err := d.hook(ctx, "dest-resumed"); err != nil {
		return 0, err
	}
	m.rec.State = DestCommitted
	if err := d.cfg.Journal.Put(m.rec); err != nil {
		d.log.Error("journal write failed", "migration_id", id, "error", err)
	}
	// The page store and the images (the size of the workload) go after
	// the answer: the source counts the time to it as downtime.
	recv := m.recv
	m.recv = nil
	d.cleanups.Add(1)
	go func() {
		defer d.cleanups.Done()
		if recv != nil {
			recv.Close()
		}
		d.cfg.Local.Cleanup(id)
	}()
	d.forget(id)
	d.log.Info("committed: process resumed", "migration_id", id, "pid", m.tree.PID)
	if err := d.hook(ctx, "dest-commit-ack"); err != nil {
		return 0, err
	}
	return m.tree.PID, nil
}

// Abort discards everything of a migration. Repeating it, or aborting a
// migration this host never heard of, is harmless; aborting a committed
// migration is refused.
func (d *Destination) Abort(ctx context.Context, id, reason string) error {
	m, err := d.get(id)
	if errors.Is(err, ErrUnknownMigration) {
		if r, jerr := d.cfg.Journal.Get(id); jerr == nil && r.State == DestCommitted {
			return fmt.Errorf("%w: migration %s was committed here", ErrTooLate, id)
		}
		return nil
	}
	if err != nil {
		return err
	}
	m.mu.Lock()
	if m.rec.State == DestCommitted {
		m.mu.Unlock()
		return fmt.Errorf("%w: migration %s was committed here", ErrTooLate, id)
	}
	m.rec.State = DestAborted
	if m.rec.Error == "" {
		m.rec.Error = reason
	}
	m.mu.Unlock()
	d.discard(m)
	d.log.Info("migration aborted", "migration_id", id, "reason", reason)
	return nil
}

func (d *Destination) discard(m *destMigration) {
	m.mu.Lock()
	if m.imgFile != nil {
		m.imgFile.Close()
		m.imgFile = nil
	}
	if m.restored {
		if err := d.cfg.Local.Kill(m.tree); err != nil {
			d.log.Error("removing the restored copy failed", "migration_id", m.rec.ID, "error", err)
		}
		m.restored = false
	}
	recv := m.recv
	m.recv = nil
	rec := m.rec
	m.mu.Unlock()
	if recv != nil {
		recv.Close()
	}
	d.cfg.Local.Cleanup(rec.ID)
	if err := d.cfg.Journal.Put(rec); err != nil {
		d.log.Error("journal write failed", "migration_id", rec.ID, "error", err)
	}
	d.forget(rec.ID)
}

// forget drops a finished migration from memory; its journal record
// answers later calls.
func (d *Destination) forget(id string) {
	d.mu.Lock()
	delete(d.migs, id)
	d.mu.Unlock()
}

// Status reports this host's view of a migration.
func (d *Destination) Status(id string) PeerState {
	m, err := d.get(id)
	if err != nil {
		if r, jerr := d.cfg.Journal.Get(id); jerr == nil && r.Role == "destination" {
			return PeerState{State: r.State, PID: r.DestPID, Err: r.Error}
		}
		return PeerState{State: DestUnknown}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return PeerState{State: m.rec.State, PID: m.tree.PID, Err: m.rec.Error}
}

// Records returns the destination-side records this agent holds.
func (d *Destination) Records() []Record {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Record, 0, len(d.migs))
	for _, m := range d.migs {
		m.mu.Lock()
		out = append(out, m.rec)
		m.mu.Unlock()
	}
	return out
}

// Close discards migrations that have not been restored. Restored,
// stopped trees are kept (the source decides their fate; recovery after
// restart resolves them through the journal).
func (d *Destination) Close() {
	defer d.cleanups.Wait()
	d.mu.Lock()
	ms := make([]*destMigration, 0, len(d.migs))
	for _, m := range d.migs {
		ms = append(ms, m)
	}
	d.mu.Unlock()
	for _, m := range ms {
		m.mu.Lock()
		st := m.rec.State
		m.mu.Unlock()
		if st == DestPrepared || st == DestReceiving {
			m.mu.Lock()
			m.rec.State = DestAborted
			m.rec.Error = "destination agent shut down"
			m.mu.Unlock()
			d.discard(m)
		}
	}
}
