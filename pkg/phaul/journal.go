package phaul

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// Record is one migration's entry in an agent's journal.
type Record struct {
	ID   string `json:"id"`
	Role string `json:"role"` // "source" or "destination"
	PID  int    `json:"pid"`
	PIDs []int  `json:"pids,omitempty"`
	// Identity of the tree's tasks (source: the original; destination:
	// the restored copy), so that recovery never signals a process that
	// only reuses a PID.
	Identity Identity `json:"identity,omitempty"`
	// Peer is the other agent: for the source the destination's
	// address, for the destination the source's authenticated identity
	// (the migration's owner).
	Peer    string    `json:"peer,omitempty"`
	State   string    `json:"state"`
	Phase   string    `json:"phase,omitempty"`
	DestPID int       `json:"dest_pid,omitempty"`
	Error   string    `json:"error,omitempty"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
}

// Journal states. A source record moves started → frozen → decided-commit
// → done, or → decided-abort → aborted. The decision is written before it
// is acted on.
const (
	StateStarted       = "started"
	StateFrozen        = "frozen"
	StateDecidedCommit = "decided-commit"
	StateDecidedAbort  = "decided-abort"
	StateDone          = "done"
	StateAborted       = "aborted"
	StateFailed        = "failed"
)

// Terminal reports whether a record needs no more work.
func (r Record) Terminal() bool {
	switch r.State {
	case StateDone, StateAborted, StateFailed, DestCommitted:
		return true
	}
	return false
}

// MaxFinished is how many finished records a journal keeps for `migratectl
// status` and `list`; older ones are removed.
var MaxFinished = 256

// Journal keeps one record per migration as a file under dir, replaced
// atomically (write, fsync, rename, fsync dir) so that a record survives
// kill -9 and power loss whole or not at all.
type Journal struct {
	dir string
	mu  sync.Mutex
}

// OpenJournal opens (creating) the journal directory.
func OpenJournal(dir string) (*Journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	return &Journal{dir: dir}, nil
}

func (j *Journal) path(id string) string { return filepath.Join(j.dir, id+".json") }

// Put writes r durably.
func (j *Journal) Put(r Record) error {
	if !ValidID(r.ID) {
		return fmt.Errorf("journal: %w: %q", ErrBadID, r.ID)
	}
	r.Updated = time.Now()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	tmp, err := os.CreateTemp(j.dir, ".tmp-"+r.ID+"-*")
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("journal: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("journal: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if err := os.Rename(tmp.Name(), j.path(r.ID)); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	d, err := os.Open(j.dir)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if r.Terminal() {
		j.prune()
	}
	return nil
}

// prune removes the oldest finished records beyond MaxFinished. Called
// with j.mu held.
func (j *Journal) prune() {
	ents, err := os.ReadDir(j.dir)
	if err != nil || len(ents) <= MaxFinished {
		return
	}
	type fin struct {
		path string
		t    time.Time
	}
	var done []fin
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(j.dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var r Record
		if json.Unmarshal(b, &r) != nil || !r.Terminal() {
			continue
		}
		done = append(done, fin{p, r.Updated})
	}
	if len(done) <= MaxFinished {
		return
	}
	sort.Slice(done, func(a, b int) bool { return done[a].t.Before(done[b].t) })
	for _, f := range done[:len(done)-MaxFinished] {
		_ = os.Remove(f.path)
	}
}

// Get reads one record; ErrUnknownMigration if absent.
func (j *Journal) Get(id string) (Record, error) {
	if !ValidID(id) {
		return Record{}, fmt.Errorf("%w: %q", ErrBadID, id)
	}
	b, err := os.ReadFile(j.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return Record{}, fmt.Errorf("%w: %s", ErrUnknownMigration, id)
	}
	if err != nil {
		return Record{}, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, fmt.Errorf("journal record %s: %w", id, err)
	}
	return r, nil
}

// List returns every record, newest first. Unreadable records are
// returned as errors alongside the good ones.
func (j *Journal) List() ([]Record, []error) {
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, []error{err}
	}
	var out []Record
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		r, err := j.Get(strings.TrimSuffix(name, ".json"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Started.After(out[b].Started) })
	return out, errs
}

// ValidID reports whether id is a usable migration id: 1–64 letters,
// digits, '-' or '_'.
func ValidID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}
