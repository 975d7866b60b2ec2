package e2e

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestCancel cancels a migration during pre-copy: the process keeps
// running on the source and the destination holds nothing. Cancelling a
// finished migration says it is too late.
func TestCancel(t *testing.T) {
	b := newMigrationBed(t)
	p := startMemhog(t, b.A, "--mem", "64", "--hot", "1")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	id := "cancel-me"
	done := make(chan MoveResult, 1)
	go func() { done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, "--id", id, "--bandwidth", "4M") }()
	if !waitLog(t, b.SrcAgent, "phase=precopy", time.Minute) {
		t.Fatal("pre-copy never started")
	}
	cancelMove(t, b.SrcAgent, id)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r := <-done
	if r.Err == nil || r.Last.Phase != "failed" || !strings.Contains(r.Last.Error, "cancelled") || r.Last.ProcessLocation != "source" {
		t.Fatalf("move after cancel: err=%v last=%+v", r.Err, r.Last)
	}
	assertRunsOnSource(t, b, p, before)
	status, _, err := b.SrcAgent.Ctl(ctx, "status", id)
	if err != nil || !strings.Contains(status, "aborted") {
		t.Fatalf("status after cancel: %v %s", err, status)
	}

	// A finished migration cannot be cancelled.
	r = b.SrcAgent.Move(t, p.PID, b.DstAgent, "--id", "done-already")
	assertMoved(t, b, p, r, before)
	_, serr, err := b.SrcAgent.Ctl(ctx, "cancel", "done-already")
	if err == nil || !strings.Contains(serr, "commit") {
		t.Fatalf("cancel after the commit: err=%v stderr=%s", err, serr)
	}
}

// TestSourceProcessExits ends a migration whose process exits by itself
// during pre-copy: the migration ends cleanly as "process exited".
func TestSourceProcessExits(t *testing.T) {
	b := newMigrationBed(t)
	p := startMemhog(t, b.A, "--mem", "64", "--hot", "1")
	done := make(chan MoveResult, 1)
	go func() { done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, "--bandwidth", "8M") }()
	if !waitLog(t, b.SrcAgent, "phase=precopy", time.Minute) {
		t.Fatal("pre-copy never started")
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.Err == nil || !strings.Contains(r.Last.Error, "process exited") {
		t.Fatalf("move of an exiting process: err=%v last=%+v", r.Err, r.Last)
	}
	if _, err := p.On(b.B).Info(); err == nil {
		t.Fatalf("pid %d exists on the destination", p.PID)
	}
	assertNoLeftovers(t, b)
	t.Logf("error as the user sees it: %s", r.Last.Error)
}

// TestCancelLaterPhases cancels a migration while its tree is frozen on
// the source (held after the final dump) and while the destination
// restores it: each time the source's copy resumes and keeps counting with
// its memory intact, and the destination holds nothing.
func TestCancelLaterPhases(t *testing.T) {
	cases := []struct {
		name, point string
		onSource    bool
	}{
		{"after the final dump", "after-dump", true},
		{"during image transfer", "transfer", true},
		{"during restore", "dest-restore", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			RequireCRIU(t)
			hs := NewHosts(t, 2)
			b := &migrationBed{A: hs[0], B: hs[1]}
			fp := []string{"--failpoints", c.point + "=stall(5s)"}
			var srcFlags, dstFlags []string
			if c.onSource {
				srcFlags = fp
			} else {
				dstFlags = fp
			}
			b.SrcAgent = StartAgent(t, b.A, srcFlags...)
			b.DstAgent = StartAgent(t, b.B, dstFlags...)
			p := startMemhog(t, b.A, "--mem", "32", "--hot", "1")
			before, err := p.Status()
			if err != nil {
				t.Fatal(err)
			}
			cw := watchCounter(p)
			id := "cancel-late"
			done := make(chan MoveResult, 1)
			go func() { done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, "--id", id) }()
			held := b.DstAgent
			if c.onSource {
				held = b.SrcAgent
			}
			if !waitLog(t, held, "point="+c.point, 2*time.Minute) {
				r := <-done
				t.Fatalf("failpoint %s never fired; move ended with %v: %+v", c.point, r.Err, r.Last)
			}
			cancelMove(t, b.SrcAgent, id)
			r := <-done
			if r.Err == nil || r.Last.ProcessLocation != "source" {
				t.Fatalf("move after cancel: err=%v last=%+v", r.Err, r.Last)
			}
			t.Logf("error as the user sees it: %s", r.Last.Error)
			assertRunsOnSource(t, b, p, before)
			cw.Stop(t)
		})
	}
}

// cancelMove runs `migratectl cancel ID` on a and fails the test unless it
// says the migration was cancelled.
func cancelMove(t *testing.T, a *Agent, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, serr, err := a.Ctl(ctx, "cancel", id)
	if err != nil || !strings.Contains(out, "cancelled") {
		t.Fatalf("cancel: %v %s %s", err, out, serr)
	}
}
