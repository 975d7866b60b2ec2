package phaul

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestJournalRoundTrip(t *testing.T) {
	j, err := OpenJournal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := Record{ID: "m-1", Role: "source", PID: 42, PIDs: []int{42, 43}, State: StateStarted, Started: time.Now()}
	if err := j.Put(r); err != nil {
		t.Fatal(err)
	}
	r.State = StateDecidedCommit
	if err := j.Put(r); err != nil {
		t.Fatal(err)
	}
	got, err := j.Get("m-1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != StateDecidedCommit || got.PID != 42 || len(got.PIDs) != 2 {
		t.Fatalf("Get = %+v", got)
	}
	if _, err := j.Get("m-2"); !errors.Is(err, ErrUnknownMigration) {
		t.Fatalf("Get of a missing record: %v", err)
	}
	if err := j.Put(Record{ID: "../escape"}); !errors.Is(err, ErrBadID) {
		t.Fatalf("Put with a path in the id: %v", err)
	}
	// No temporary files are left behind.
	ents, _ := os.ReadDir(j.dir)
	if len(ents) != 1 {
		t.Fatalf("journal dir holds %d entries, want 1", len(ents))
	}
}

func TestJournalListSkipsGarbage(t *testing.T) {
	dir := t.TempDir()
	j, _ := OpenJournal(dir)
	for i, id := range []string{"a", "b"} {
		if err := j.Put(Record{ID: id, State: StateDone, Started: time.Unix(int64(i), 0)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "c.json"), []byte("{truncated"), 0o600); err != nil {
		t.Fatal(err)
	}
	recs, errs := j.List()
	if len(recs) != 2 || recs[0].ID != "b" {
		t.Fatalf("List = %+v", recs)
	}
	if len(errs) != 1 {
		t.Fatalf("List errors = %v, want one for the truncated record", errs)
	}
}

func TestValidID(t *testing.T) {
	for id, want := range map[string]bool{
		"m-20261203-abc_1": true, "": false, "a/b": false, "..": false, "x y": false,
		string(make([]byte, 65)): false,
	} {
		if got := ValidID(id); got != want {
			t.Errorf("ValidID(%q) = %v, want %v", id, got, want)
		}
	}
}
