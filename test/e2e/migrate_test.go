package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// migrationBed is two hosts, each running migrated.
type migrationBed struct {
	A, B     *Host
	SrcAgent *Agent
	DstAgent *Agent
}

func newMigrationBed(t *testing.T, dstFlags ...string) *migrationBed {
	t.Helper()
	RequireCRIU(t)
	hs := NewHosts(t, 2)
	b := &migrationBed{A: hs[0], B: hs[1]}
	b.SrcAgent = StartAgent(t, b.A)
	b.DstAgent = StartAgent(t, b.B, dstFlags...)
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("E2E_AGENT_LOGS") != "" {
			t.Logf("source agent log:\n%s", b.SrcAgent.Log())
			t.Logf("destination agent log:\n%s", b.DstAgent.Log())
		}
	})
	return b
}

// startMemhog starts memhog in h with a status file in a directory both
// hosts see.
func startMemhog(t *testing.T, h *Host, args ...string) *Proc {
	t.Helper()
	status := filepath.Join(h.bedDir(), fmt.Sprintf("memhog-%d.status", time.Now().UnixNano()))
	p := h.Start(t, StartOptions{StatusFile: status}, MemhogBinary(t), append(args, "--status", status)...)
	WaitStatus(t, p, func(s WorkloadStatus) bool { return s.Counter > 20 }, 60*time.Second)
	return p
}

// counterWatch reads a workload's status file every few milliseconds while
// it moves: the source's copy and, after a restore, the destination's copy
// write the same file, so the counter it shows must never go down. A
// restore from stale memory (a page of the counter from an earlier
// pre-copy round instead of the final dump) would show as a drop.
type counterWatch struct {
	p     *Proc
	stop  chan struct{}
	done  chan struct{}
	reads atomic.Int64
	drop  atomic.Value // string: the first drop seen
}

func watchCounter(p *Proc) *counterWatch {
	w := &counterWatch{p: p, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		var last uint64
		for {
			if s, err := p.Status(); err == nil {
				w.reads.Add(1)
				if s.Counter < last && w.drop.Load() == nil {
					w.drop.Store(fmt.Sprintf("counter %d (pid %d) after %d", s.Counter, s.PID, last))
				}
				last = max(last, s.Counter)
			}
			select {
			case <-w.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return w
}

// Stop ends the watch and fails the test if the counter went down.
func (w *counterWatch) Stop(t *testing.T) {
	t.Helper()
	close(w.stop)
	<-w.done
	if d := w.drop.Load(); d != nil {
		t.Errorf("the workload's counter went back during the move: %s", d)
	}
	if w.reads.Load() == 0 {
		t.Errorf("the counter watch never read the status file %s", w.p.StatusFile)
	}
}

// assertMoved checks that p runs on dst with the same PID, its counter went
// on from where it was and its memory is intact, and nothing of it is left
// on the source.
func assertMoved(t *testing.T, b *migrationBed, p *Proc, r MoveResult, before WorkloadStatus) *Proc {
	t.Helper()
	logEvents(t, r)
	if r.Err != nil {
		t.Fatalf("migratectl move failed: %v\nstderr: %s\nlast event: %+v", r.Err, r.Stderr, r.Last)
	}
	if r.Last.Phase != "done" || r.Last.DestPID == nil || r.Last.DowntimeMs == nil || r.Last.TotalMs == nil || r.Last.Rounds == nil {
		t.Fatalf("last event is not a complete summary: %+v", r.Last)
	}
	if int(*r.Last.DestPID) != p.PID {
		t.Fatalf("dest_pid = %d, want the same PID %d", *r.Last.DestPID, p.PID)
	}
	q := p.On(b.B)
	info, err := q.Info()
	if err != nil {
		t.Fatalf("pid %d not found on %s after the move: %v", p.PID, b.B.Name, err)
	}
	if info.State == 'T' || info.State == 'Z' {
		t.Fatalf("pid %d on %s is in state %c, want running", p.PID, b.B.Name, info.State)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		info, err := p.Info()
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still exists on the source %s: %+v", p.PID, b.A.Name, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p.StatusFile == "" {
		// Not a status-writing workload: the caller checks its state.
		assertNoLeftovers(t, b)
		return q
	}
	st := WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > before.Counter+50 && s.PID == p.PID }, 30*time.Second)
	if st.Counter < before.Counter {
		t.Fatalf("counter went backwards: %d after %d", st.Counter, before.Counter)
	}
	if before.ColdSum != "" {
		v := Verify(t, q)
		if v.Verify != "ok" || v.ColdSumNow != before.ColdSum {
			t.Fatalf("memory not intact after the move: verify=%s cold_sum_now=%s want %s", v.Verify, v.ColdSumNow, before.ColdSum)
		}
	}
	assertNoLeftovers(t, b)
	return q
}

// assertNoLeftovers checks that neither agent keeps work directories or
// CRIU processes after a migration ended.
func assertNoLeftovers(t *testing.T, b *migrationBed) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []string
		for _, a := range []*Agent{b.SrcAgent, b.DstAgent} {
			ents, _ := os.ReadDir(a.WorkDir)
			for _, e := range ents {
				left = append(left, a.Host.Name+": work dir "+e.Name())
			}
			procs, err := a.Host.Processes()
			if err != nil {
				t.Fatal(err)
			}
			for _, pi := range procs {
				if pi.Comm == "criu" {
					left = append(left, fmt.Sprintf("%s: criu process %d (%s)", a.Host.Name, pi.PID, strings.Join(pi.Cmdline, " ")))
				}
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind after the migration:\n%s", strings.Join(left, "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// assertRunsOnSource checks that a failed move left p running on the
// source and nothing on the destination.
func assertRunsOnSource(t *testing.T, b *migrationBed, p *Proc, before WorkloadStatus) {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatalf("pid %d is gone from the source after a failed move: %v", p.PID, err)
	}
	if info.State == 'T' {
		t.Fatalf("pid %d is still frozen on the source after a failed move", p.PID)
	}
	WaitStatus(t, p, func(s WorkloadStatus) bool { return s.Counter > before.Counter+50 }, 30*time.Second)
	if before.ColdSum != "" {
		if v := Verify(t, p); v.Verify != "ok" {
			t.Fatalf("memory damaged on the source after a failed move: %+v", v)
		}
	}
	if q, err := p.On(b.B).Info(); err == nil && strings.Contains(strings.Join(q.Cmdline, " "), "memhog") {
		t.Fatalf("a copy of pid %d exists on the destination (state %c) after a failed move", p.PID, q.State)
	}
	assertNoLeftovers(t, b)
}

func logEvents(t *testing.T, r MoveResult) {
	t.Helper()
	for _, e := range r.Events {
		t.Logf("%6d ms %-8s %s", e.ElapsedMs, e.Phase, e.Message)
	}
}

func finalDumpEvent(r MoveResult) (MoveEvent, bool) {
	for _, e := range r.Events {
		if e.Phase == "dump" && (e.PagesSent > 0 || e.PagesReferenced > 0) {
			return e, true
		}
	}
	return MoveEvent{}, false
}

func TestMoveMemhog(t *testing.T) {
	for _, mode := range []string{"precopy", "stopcopy"} {
		t.Run(mode, func(t *testing.T) {
			b := newMigrationBed(t)
			p := startMemhog(t, b.A, "--mem", "512", "--hot", "4")
			before, err := p.Status()
			if err != nil {
				t.Fatal(err)
			}
			cw := watchCounter(p)
			r := b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", mode)
			assertMoved(t, b, p, r, before)
			cw.Stop(t)
			rounds := int(*r.Last.Rounds)
			dump, ok := finalDumpEvent(r)
			if !ok {
				t.Fatalf("no final dump event in %+v", r.Events)
			}
			totalPages := uint64(512 << 20 >> 12)
			t.Logf("%s: rounds=%d final dump sent=%d referenced=%d pages, wire=%d MiB, downtime=%d ms, total=%d ms",
				mode, rounds, dump.PagesSent, dump.PagesReferenced, r.Last.WireBytes>>20, *r.Last.DowntimeMs, *r.Last.TotalMs)
			switch mode {
			case "precopy":
				if rounds < 2 {
					t.Fatalf("pre-copy took %d rounds, want at least 2", rounds)
				}
				if dump.PagesSent > totalPages/10 {
					t.Fatalf("final dump sent %d pages of %d: pre-copy did not spare the final dump", dump.PagesSent, totalPages)
				}
				if dump.PagesReferenced < totalPages/2 {
					t.Fatalf("final dump referenced only %d pages of %d", dump.PagesReferenced, totalPages)
				}
			case "stopcopy":
				if rounds != 0 {
					t.Fatalf("stopcopy ran %d pre-copy rounds", rounds)
				}
				if dump.PagesSent < totalPages*9/10 {
					t.Fatalf("stopcopy final dump sent %d pages, want about %d", dump.PagesSent, totalPages)
				}
			}
		})
	}
}

func TestMoveProcessTree(t *testing.T) {
	for _, mode := range []string{"precopy", "stopcopy"} {
		t.Run(mode, func(t *testing.T) {
			b := newMigrationBed(t)
			p := startMemhog(t, b.A, "--mem", "32", "--hot", "1", "--children", "2")
			before := WaitStatus(t, p, func(s WorkloadStatus) bool { return len(s.Children) == 2 && len(s.ChildCount) == 2 }, 30*time.Second)
			r := b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", mode)
			q := assertMoved(t, b, p, r, before)
			after := WaitStatus(t, q, func(s WorkloadStatus) bool {
				return len(s.ChildCount) == 2 && s.ChildCount[0] > before.ChildCount[0] && s.ChildCount[1] > before.ChildCount[1]
			}, 30*time.Second)
			for i, c := range before.Children {
				if after.Children[i] != c {
					t.Fatalf("child %d changed PID: %d → %d", i, c, after.Children[i])
				}
				if _, err := b.B.Process(c); err != nil {
					t.Fatalf("child %d (pid %d) not on the destination: %v", i, c, err)
				}
				if _, err := b.A.Process(c); err == nil {
					t.Fatalf("child %d (pid %d) still on the source", i, c)
				}
			}
		})
	}
}

func TestMoveGoThreads(t *testing.T) {
	for _, mode := range []string{"precopy", "stopcopy"} {
		t.Run(mode, func(t *testing.T) {
			b := newMigrationBed(t)
			status := filepath.Join(b.A.bedDir(), fmt.Sprintf("gothreads-%s.status", mode))
			p := b.A.Start(t, StartOptions{StatusFile: status}, GoThreadsBinary(t), "--status", status)
			before := WaitStatus(t, p, func(s WorkloadStatus) bool { return s.Counter > 20 && s.Threads > 1 }, 60*time.Second)
			r := b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", mode)
			q := assertMoved(t, b, p, r, before)
			after := WaitStatus(t, q, func(s WorkloadStatus) bool {
				if len(s.ThreadCount) != len(before.ThreadCount) {
					return false
				}
				for i := range s.ThreadCount {
					if s.ThreadCount[i] <= before.ThreadCount[i] {
						return false
					}
				}
				return true
			}, 30*time.Second)
			t.Logf("%d threads counting on after the move: %v", after.Threads, after.ThreadCount)
		})
	}
}

func TestMoveFilesPipeSocket(t *testing.T) {
	cases := []struct{ name, mode, extra string }{
		{"precopy", "precopy", ""},
		{"stopcopy", "stopcopy", ""},
		// The sockets go with --tcp-established (nftables network lock on
		// both sides); no lock may stay on either host afterwards.
		{"tcp-established", "precopy", "--tcp-established"},
	}
	for _, c := range cases {
		mode := c.mode
		t.Run(c.name, func(t *testing.T) {
			b := newMigrationBed(t)
			file := filepath.Join(b.A.bedDir(), "memhog-"+c.name+".log")
			p := startMemhog(t, b.A, "--mem", "16", "--file", file, "--pipe", "--listen", "8080")
			before := WaitStatus(t, p, func(s WorkloadStatus) bool { return s.FileLines >= 1 && s.PipeSeq > 10 }, 30*time.Second)
			args := []string{"--mode", mode}
			if c.extra != "" {
				args = append(args, c.extra)
			}
			r := b.SrcAgent.Move(t, p.PID, b.DstAgent, args...)
			q := assertMoved(t, b, p, r, before)
			after := WaitStatus(t, q, func(s WorkloadStatus) bool {
				return s.FileLines > before.FileLines && s.PipeSeq > before.PipeSeq+10
			}, 30*time.Second)
			if after.PipeErrors != 0 {
				t.Fatalf("pipe lost or repeated %d sequence numbers across the move", after.PipeErrors)
			}
			// The listening socket answers on the destination's address.
			out := b.B.Run(t, "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/"+b.B.IP+"/8080; head -n1 <&3")
			if strings.TrimSpace(out) == "" {
				t.Fatalf("listening socket did not answer on the destination")
			}
			lines, err := os.ReadFile(file)
			if err != nil || len(strings.Split(strings.TrimSpace(string(lines)), "\n")) < after.FileLines {
				t.Fatalf("file %s has fewer lines than the workload wrote: %v", file, err)
			}
			for _, h := range []*Host{b.A, b.B} {
				if tables := h.Run(t, "nft", "list", "tables"); strings.Contains(tables, "CRIU-") {
					t.Fatalf("CRIU's network lock stayed on %s after the move: %s", h.Name, tables)
				}
			}
		})
	}
}

func TestMoveRedis(t *testing.T) {
	for _, mode := range []string{"precopy", "stopcopy"} {
		t.Run(mode, func(t *testing.T) {
			b := newMigrationBed(t)
			if _, err := os.Stat("/usr/bin/redis-server"); err != nil {
				t.Fatalf("redis-server missing (make setup installs it): %v", err)
			}
			dir := b.A.bedDir()
			p := b.A.Start(t, StartOptions{Dir: dir}, "/usr/bin/redis-server", "--port", "6379", "--bind", "0.0.0.0",
				"--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no", "--dir", dir,
				"--enable-debug-command", "yes")
			deadline := time.Now().Add(20 * time.Second)
			for {
				out, err := b.A.Command(context.Background(), "redis-cli", "-p", "6379", "PING").CombinedOutput()
				if err == nil && strings.TrimSpace(string(out)) == "PONG" {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("redis did not start: %s", out)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if out := b.A.Run(t, "redis-cli", "-p", "6379", "DEBUG", "POPULATE", "100000", "key", "16"); strings.TrimSpace(out) != "OK" {
				t.Fatalf("DEBUG POPULATE: %s", out)
			}
			b.A.Run(t, "redis-cli", "-p", "6379", "SET", "migrated:marker", "before-"+mode)
			r := b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", mode)
			assertMoved(t, b, p, r, WorkloadStatus{})
			if got := strings.TrimSpace(b.B.Run(t, "redis-cli", "-h", b.B.IP, "-p", "6379", "DBSIZE")); got != "100001" {
				t.Fatalf("DBSIZE on the destination = %q, want 100001", got)
			}
			if got := strings.TrimSpace(b.B.Run(t, "redis-cli", "-h", b.B.IP, "-p", "6379", "GET", "migrated:marker")); got != "before-"+mode {
				t.Fatalf("marker on the destination = %q", got)
			}
			if got := strings.TrimSpace(b.B.Run(t, "redis-cli", "-h", b.B.IP, "-p", "6379", "GET", "key:4242")); got == "" {
				t.Fatalf("key:4242 missing on the destination")
			}
			b.B.Run(t, "redis-cli", "-h", b.B.IP, "-p", "6379", "SET", "after", "1")
		})
	}
}

func TestMovePreflightFailures(t *testing.T) {
	b := newMigrationBed(t)
	p := startMemhog(t, b.A, "--mem", "16")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("pid not found", func(t *testing.T) {
		r := b.SrcAgent.Move(t, 999999, b.DstAgent)
		if r.Err == nil {
			t.Fatalf("move of a missing pid succeeded: %+v", r.Last)
		}
		if !strings.Contains(r.Last.Error, "no such process") {
			t.Fatalf("error does not say the process is missing: %q", r.Last.Error)
		}
	})

	t.Run("pid used on destination", func(t *testing.T) {
		occupant := b.B.occupyPID(t, p.PID)
		defer occupant.Kill()
		r := b.SrcAgent.Move(t, p.PID, b.DstAgent)
		if r.Err == nil {
			t.Fatalf("move succeeded although pid %d is taken on the destination", p.PID)
		}
		if !strings.Contains(r.Last.Error, "already in use on the destination") || r.Last.ProcessLocation != "source" {
			t.Fatalf("unclear error: %q (location %q)", r.Last.Error, r.Last.ProcessLocation)
		}
		assertRunsOnSource(t, b, p, before)
	})

	t.Run("destination unreachable", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, serr, err := b.SrcAgent.Ctl(ctx, "move", fmt.Sprint(p.PID), "--to", "10.201.0.99:7446")
		if err == nil {
			t.Fatalf("move to an unreachable destination succeeded: %s", out)
		}
		if !strings.Contains(serr, "unreachable") || !strings.Contains(serr, "source") {
			t.Fatalf("unclear error: stdout %q stderr %q", out, serr)
		}
		assertRunsOnSource(t, b, p, before)
	})

	t.Run("check reports problems", func(t *testing.T) {
		occupant := b.B.occupyPID(t, p.PID)
		defer occupant.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, _, err := b.SrcAgent.Ctl(ctx, "check", fmt.Sprint(p.PID), "--to", b.DstAgent.Addr)
		if err == nil || !strings.Contains(out, "already in use") {
			t.Fatalf("check did not report the PID conflict: err=%v out=%s", err, out)
		}
	})
	t.Run("criu missing on destination", func(t *testing.T) {
		// Last: the destination agent is replaced for good.
		b.DstAgent.Stop(t)
		broken := StartAgent(t, b.B, "--criu", "/nonexistent/criu")
		b.DstAgent = broken
		r := b.SrcAgent.Move(t, p.PID, broken)
		if r.Err == nil {
			t.Fatalf("move to a destination without CRIU succeeded")
		}
		if !strings.Contains(r.Last.Error, "CRIU") || r.Last.ProcessLocation != "source" {
			t.Fatalf("unclear error: %q (location %q)", r.Last.Error, r.Last.ProcessLocation)
		}
		assertRunsOnSource(t, b, p, before)
	})

}

// TestMoveRestoreFails takes the process's PID on the destination between
// the preflight and the restore: the restore fails, the source resumes and
// the destination keeps nothing.
func TestMoveRestoreFails(t *testing.T) {
	cases := []struct {
		name  string
		flags []string
	}{
		{"precopy", []string{"--mode", "precopy"}},
		{"stopcopy", []string{"--mode", "stopcopy"}},
		// With --tcp-established CRIU locks the tree's connections with an
		// nftables table and keeps it for a tree left stopped: the abort
		// must lift it, or the resumed source is cut off its network.
		{"tcp-established", []string{"--mode", "stopcopy", "--tcp-established"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := newMigrationBed(t, "--failpoints", "dest-restore=stall(3s)")
			p := startMemhog(t, b.A, "--mem", "64", "--hot", "1", "--listen", "8080")
			before, err := p.Status()
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan MoveResult, 1)
			go func() { done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, c.flags...) }()
			deadline := time.Now().Add(2 * time.Minute)
			for !strings.Contains(b.DstAgent.Log(), "point=dest-restore") {
				if time.Now().After(deadline) {
					t.Fatalf("the destination never reached the restore")
				}
				time.Sleep(20 * time.Millisecond)
			}
			occupant := b.B.occupyPID(t, p.PID)
			defer occupant.Kill()
			r := <-done
			if r.Err == nil {
				t.Fatalf("move succeeded although the PID was taken before the restore")
			}
			if r.Last.FailedPhase != "restore" || r.Last.ProcessLocation != "source" {
				t.Fatalf("failed phase %q, location %q; error %q", r.Last.FailedPhase, r.Last.ProcessLocation, r.Last.Error)
			}
			t.Logf("error as the user sees it: %s", r.Last.Error)
			occupant.Kill()
			assertRunsOnSource(t, b, p, before)
			if tables := b.A.Run(t, "nft", "list", "tables"); strings.Contains(tables, "CRIU-") {
				t.Fatalf("CRIU's network lock stayed on the source after the abort: %s", tables)
			}
			// The resumed source answers on its own address, from the other host.
			out := b.B.Run(t, "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/"+b.A.IP+"/8080; head -n1 <&3")
			if !strings.HasPrefix(strings.TrimSpace(out), "counter=") {
				t.Fatalf("the resumed source did not answer on %s:8080: %q", b.A.IP, out)
			}
		})
	}
}
