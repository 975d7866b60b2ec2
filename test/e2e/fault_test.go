package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The fault matrix: for each phase boundary and each fault, a migration is
// broken there; once the failed part is back, exactly one copy of the
// process must run, its counter must not have gone backwards and its memory
// must be intact, and no work dirs, CRIU processes or stopped copies may
// remain. A sampler checks both hosts every few milliseconds that two
// copies never run at once.

// faultPhase names a phase boundary and the failpoints that sit on it.
type faultPhase struct {
	name string
	src  string // source agent failpoint
	dst  string // destination agent failpoint
}

var faultPhases = []faultPhase{
	{"after prepare", "after-prepare", "dest-prepare"},
	{"during pre-copy", "precopy-round", "dest-pages"},
	{"after freeze", "after-dump", "dest-final"},
	{"during image transfer", "transfer", "dest-images"},
	{"during restore", "restore", "dest-restore"},
	{"after restore, before commit", "before-commit", "dest-restored"},
	{"after the decision is journaled", "after-decision", "dest-commit"},
	{"after commit, before the ack", "after-commit", "dest-resumed"},
}

type faultKind string

const (
	killSource faultKind = "source agent killed"
	killDest   faultKind = "destination agent killed"
	cutLink    faultKind = "link cut"
	criuSource faultKind = "CRIU fails on the source"
	criuDest   faultKind = "CRIU fails on the destination"
)

type matrixRow struct {
	fault    faultKind
	phase    string
	outcome  string
	converge time.Duration
}

var (
	matrixMu sync.Mutex
	matrix   []matrixRow
)

func recordMatrix(r matrixRow) {
	matrixMu.Lock()
	matrix = append(matrix, r)
	matrixMu.Unlock()
}

// copySampler watches a PID on two hosts and counts instants at which both
// run it.
type copySampler struct {
	a, b     *Host
	pid      int
	both     atomic.Int64
	samples  atomic.Int64
	stop     chan struct{}
	done     chan struct{}
	firstBad atomic.Value
}

// running reports whether h runs pid: it exists, is not stopped, and is
// not on its way out. A stopped task that is sent SIGKILL is woken to die
// and shows state R for an instant without running any of its own code
// again: such a task has SIGKILL pending or PF_EXITING set.
func running(h *Host, pid int) (bool, byte) {
	info, err := h.Process(pid)
	if err != nil {
		return false, 0
	}
	if !strings.Contains(strings.Join(info.Cmdline, " "), "memhog") {
		return false, 0
	}
	if info.State == 'T' || info.State == 't' || info.State == 'Z' || info.State == 'X' {
		return false, info.State
	}
	return !dying(info.GlobalPID), info.State
}

const pfExiting = 0x4

func dying(gpid int) bool {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", gpid))
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err == nil && mask&(1<<(9-1)) != 0 {
			return true
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", gpid))
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(stat), ')')
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) > 6 {
		if flags, err := strconv.ParseUint(fields[6], 10, 64); err == nil && flags&pfExiting != 0 {
			return true
		}
	}
	return false
}

func startSampler(a, b *Host, pid int) *copySampler {
	s := &copySampler{a: a, b: b, pid: pid, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			ra, sa := running(a, pid)
			rb, sb := running(b, pid)
			s.samples.Add(1)
			if ra && rb {
				if s.both.Add(1) == 1 {
					s.firstBad.Store(fmt.Sprintf("at %s: %s state %c, %s state %c", time.Now().Format("15:04:05.000"), a.Name, sa, b.Name, sb))
				}
			}
		}
	}()
	return s
}

func (s *copySampler) Stop(t *testing.T) {
	t.Helper()
	close(s.stop)
	<-s.done
	if n := s.both.Load(); n > 0 {
		t.Errorf("two copies ran at once in %d of %d samples (first %v)", n, s.samples.Load(), s.firstBad.Load())
	}
}

// waitOneCopy waits until exactly one running copy and no stopped copy
// exist, and returns where it runs.
func waitOneCopy(t *testing.T, b *migrationBed, pid int, timeout time.Duration) (*Host, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		ra, sa := running(b.A, pid)
		rb, sb := running(b.B, pid)
		stopped := sa == 'T' || sa == 't' || sb == 'T' || sb == 't'
		if ra != rb && !stopped {
			if ra {
				return b.A, time.Since(start)
			}
			return b.B, time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("no convergence within %s: %s running=%v state=%c, %s running=%v state=%c",
				timeout, b.A.Name, ra, sa, b.B.Name, rb, sb)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitLog(t *testing.T, a *Agent, substr string, timeout time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(a.Log(), substr) {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

func TestFaultMatrix(t *testing.T) {
	RequireCRIU(t)
	t.Cleanup(func() {
		matrixMu.Lock()
		defer matrixMu.Unlock()
		sort.SliceStable(matrix, func(i, j int) bool { return matrix[i].fault < matrix[j].fault })
		var sb strings.Builder
		fmt.Fprintf(&sb, "\n%-26s | %-32s | %-40s | %s\n", "fault", "phase", "outcome", "one copy after recovery")
		fmt.Fprintf(&sb, "%s\n", strings.Repeat("-", 120))
		for _, r := range matrix {
			fmt.Fprintf(&sb, "%-26s | %-32s | %-40s | %s\n", r.fault, r.phase, r.outcome, r.converge.Round(time.Millisecond))
		}
		t.Log(sb.String())
	})
	for _, fault := range []faultKind{killSource, killDest, cutLink} {
		for _, ph := range faultPhases {
			point, onSource := ph.src, true
			if fault == killDest || (fault == cutLink && ph.src == "after-commit") {
				point, onSource = ph.dst, false
			}
			if point == "" {
				continue
			}
			t.Run(string(fault)+"/"+ph.name, func(t *testing.T) {
				runFault(t, fault, ph.name, point, onSource)
			})
		}
	}
	t.Run(string(criuSource)+"/during the final dump", func(t *testing.T) {
		runCRIUFault(t, criuSource, "during the final dump")
	})
	t.Run(string(criuDest)+"/during the final dump", func(t *testing.T) {
		runCRIUFault(t, criuDest, "during the final dump")
	})
	t.Run(string(criuDest)+"/during restore", func(t *testing.T) {
		runCRIUFault(t, criuDest, "during restore")
	})
}

// runCRIUFault makes CRIU itself fail: killed while it dumps (source) or
// serves the page stream (destination), or a restore CRIU cannot do
// because the tree's PID was taken on the destination after the preflight.
func runCRIUFault(t *testing.T, fault faultKind, phase string) {
	var dstFlags []string
	if phase == "during restore" {
		dstFlags = []string{"--failpoints", "dest-restore=1*stall(2s)"}
	}
	b := newMigrationBed(t, dstFlags...)
	p := startMemhog(t, b.A, "--mem", "64", "--hot", "1")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	sampler := startSampler(b.A, b.B, p.PID)
	defer sampler.Stop(t)
	done := make(chan MoveResult, 1)
	go func() {
		done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", "stopcopy", "--bandwidth", "8M")
	}()
	var backAt time.Time
	switch phase {
	case "during the final dump":
		if !waitLog(t, b.SrcAgent, "phase=dump", time.Minute) {
			t.Fatal("the final dump never started")
		}
		h := b.A
		if fault == criuDest {
			h = b.B
		}
		// Every CRIU of the agent on h fails until the move ends: besides
		// the dump (or the page server) the agent may run short CRIU
		// queries, and killing only one of those would test nothing.
		killed := 0
		deadline := time.Now().Add(time.Minute)
	kill:
		for time.Now().Before(deadline) {
			procs, err := h.Processes()
			if err != nil {
				t.Fatal(err)
			}
			for _, pi := range procs {
				// The agent's CRIU runs as `criu swrk FD`; an exited one
				// not reaped yet (a zombie) would not fail anything.
				if pi.Comm != "criu" || pi.State == 'Z' || len(pi.Cmdline) < 2 || pi.Cmdline[1] != "swrk" {
					continue
				}
				if err := syscall.Kill(pi.GlobalPID, syscall.SIGKILL); err == nil {
					t.Logf("killed %s pid %d (%s, state %c)", h.Name, pi.PID, strings.Join(pi.Cmdline, " "), pi.State)
					if killed == 0 {
						backAt = time.Now()
					}
					killed++
				}
			}
			select {
			case r := <-done:
				done <- r
				break kill
			case <-time.After(20 * time.Millisecond):
			}
		}
		if killed == 0 {
			t.Fatalf("no CRIU process to kill on %s", h.Name)
		}
		t.Logf("killed %d CRIU process(es) on %s", killed, h.Name)
	case "during restore":
		if !waitLog(t, b.DstAgent, "point=dest-restore", time.Minute) {
			t.Fatal("the restore never started")
		}
		occupant := b.B.occupyPID(t, p.PID)
		r := <-done
		occupant.Kill()
		backAt = time.Now()
		done <- r
	}
	r := <-done
	if r.Err == nil {
		t.Fatalf("the move succeeded despite the CRIU failure: %+v", r.Last)
	}
	t.Logf("error as the user sees it: %s", r.Last.Error)
	where, _ := waitOneCopy(t, b, p.PID, time.Minute)
	if where != b.A {
		t.Fatalf("the process ended up on %s after a failed move", where.Name)
	}
	assertRunsOnSource(t, b, p, before)
	recordMatrix(matrixRow{fault: fault, phase: phase, outcome: "runs on " + b.A.Name + " (source resumed)", converge: time.Since(backAt)})
}

func runFault(t *testing.T, fault faultKind, phase, point string, onSource bool) {
	action := "1*kill"
	if fault == cutLink {
		action = "1*stall(2s)"
	}
	fp := []string{"--failpoints", point + "=" + action}
	var srcFlags, dstFlags []string
	if onSource {
		srcFlags = fp
	} else {
		dstFlags = fp
	}
	RequireCRIU(t)
	hs := NewHosts(t, 2)
	b := &migrationBed{A: hs[0], B: hs[1]}
	b.SrcAgent = StartAgent(t, b.A, srcFlags...)
	b.DstAgent = StartAgent(t, b.B, dstFlags...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("source agent log:\n%s", b.SrcAgent.Log())
			t.Logf("destination agent log:\n%s", b.DstAgent.Log())
		}
	})
	p := startMemhog(t, b.A, "--mem", "32", "--hot", "1")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	sampler := startSampler(b.A, b.B, p.PID)
	defer sampler.Stop(t)
	cw := watchCounter(p)

	faulty := b.DstAgent
	if onSource {
		faulty = b.SrcAgent
	}
	id := "fault-" + strings.NewReplacer(" ", "-", ",", "").Replace(string(fault)+"-"+phase)
	if len(id) > 64 {
		id = id[:64]
	}
	done := make(chan MoveResult, 1)
	go func() {
		done <- b.SrcAgent.Move(t, p.PID, b.DstAgent, "--mode", "precopy", "--id", id)
	}()
	if !waitLog(t, faulty, "point="+point, 2*time.Minute) {
		r := <-done
		t.Fatalf("failpoint %s never fired; move ended with %v: %+v", point, r.Err, r.Last)
	}
	var backAt time.Time
	switch fault {
	case killSource, killDest:
		faulty.waitGone(t, 10*time.Second)
		time.Sleep(500 * time.Millisecond)
		if onSource {
			b.SrcAgent = StartAgent(t, b.A)
		} else {
			b.DstAgent = StartAgent(t, b.B)
		}
		backAt = time.Now()
		r := <-done
		t.Logf("move after the kill: err=%v last=%s %s", r.Err, r.Last.Phase, r.Last.Error)
	case cutLink:
		b.A.LinkDown(t)
		time.Sleep(12 * time.Second) // past the peers' keepalive
		b.A.LinkUp(t)
		backAt = time.Now()
		r := <-done
		t.Logf("move across the cut: err=%v last=%s %s", r.Err, r.Last.Phase, r.Last.Error)
	}
	where, _ := waitOneCopy(t, b, p.PID, 2*time.Minute)
	total := time.Since(backAt)
	q := p.On(where)
	WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > before.Counter+20 }, 30*time.Second)
	cw.Stop(t)
	if v := Verify(t, q); v.Verify != "ok" || v.ColdSumNow != before.ColdSum {
		t.Fatalf("memory not intact: %+v", v)
	}
	assertNoLeftovers(t, b)
	assertStatusFinal(t, b.SrcAgent, id, fault == killSource)
	outcome := "runs on " + where.Name
	if where == b.A {
		outcome += " (source resumed)"
	} else {
		outcome += " (moved)"
	}
	t.Logf("%s %s: %s; one copy %s after the failed part was back", fault, phase, outcome, total.Round(time.Millisecond))
	recordMatrix(matrixRow{fault: fault, phase: phase, outcome: outcome, converge: total})
}

// assertStatusFinal waits until `migratectl status ID` on the source
// shows the migration finished (done, aborted or failed); after a restart of the
// source agent it must also say that recovery finished it.
func assertStatusFinal(t *testing.T, a *Agent, id string, recovered bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var out string
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		o, _, err := a.Ctl(ctx, "status", id)
		cancel()
		out = o
		if err == nil && (strings.Contains(out, "state: done") || strings.Contains(out, "state: aborted") || strings.Contains(out, "state: failed")) {
			if recovered && !strings.Contains(out, "restart") {
				t.Fatalf("status after the source agent's restart does not tell the recovery:\n%s", out)
			}
			t.Logf("migratectl status %s:\n%s", id, out)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("migratectl status %s never showed a finished migration:\n%s", id, out)
}

// TestBackToBack moves one process A→B→A… 20 times and checks that the
// agents leak no fds and no disk.
func TestBackToBack(t *testing.T) {
	b := newMigrationBed(t)
	p := startMemhog(t, b.A, "--mem", "16", "--hot", "1")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	agents := [2]*Agent{b.SrcAgent, b.DstAgent}
	fdsBefore := [2]int{countFDs(t, agents[0]), countFDs(t, agents[1])}
	var fdsAfter [2]int
	for i := 0; i < 20; i++ {
		src, dst := agents[i%2], agents[(i+1)%2]
		r := src.Move(t, p.PID, dst, "--mode", []string{"precopy", "stopcopy"}[i%2])
		if r.Err != nil {
			t.Fatalf("move %d (%s→%s): %v %s", i+1, src.Host.Name, dst.Host.Name, r.Err, r.Last.Error)
		}
		p = p.On(dst.Host)
		st := WaitStatus(t, p, func(s WorkloadStatus) bool { return s.Counter > before.Counter }, 30*time.Second)
		before = st
		if i == 1 {
			// The first round trip warms caches and connection pools.
			fdsBefore = [2]int{countFDs(t, agents[0]), countFDs(t, agents[1])}
		}
	}
	if v := Verify(t, p); v.Verify != "ok" {
		t.Fatalf("memory not intact after 20 moves: %+v", v)
	}
	assertNoLeftovers(t, &migrationBed{A: b.A, B: b.B, SrcAgent: agents[0], DstAgent: agents[1]})
	fdsAfter = [2]int{countFDs(t, agents[0]), countFDs(t, agents[1])}
	for i := range agents {
		if fdsAfter[i] > fdsBefore[i]+2 {
			t.Errorf("%s agent: %d fds after 18 moves, %d before: leak", agents[i].Host.Name, fdsAfter[i], fdsBefore[i])
		}
	}
	t.Logf("fds: before %v after %v", fdsBefore, fdsAfter)
}

func countFDs(t *testing.T, a *Agent) int {
	t.Helper()
	out := a.Host.Run(t, "sh", "-c", fmt.Sprintf("ls /proc/%d/fd | wc -l", a.Proc.PID))
	var n int
	fmt.Sscan(strings.TrimSpace(out), &n)
	return n
}

// TestConcurrentMoves moves four processes at once: with four migrations
// allowed per peer (limits.max_per_peer) all go through together; with two
// allowed every move either goes through or is refused at prepare with the
// process running on the source untouched, and a refused move goes through
// when retried.
func TestConcurrentMoves(t *testing.T) {
	for _, limit := range []int{4, 2} {
		t.Run(fmt.Sprintf("limit %d", limit), func(t *testing.T) { concurrentMoves(t, limit) })
	}
}

func concurrentMoves(t *testing.T, limit int) {
	b := newMigrationBed(t, "--max-per-peer", strconv.Itoa(limit))
	var ps []*Proc
	var befores []WorkloadStatus
	for i := 0; i < 4; i++ {
		p := startMemhog(t, b.A, "--mem", "32", "--hot", "1")
		st, err := p.Status()
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
		befores = append(befores, st)
	}
	var wg sync.WaitGroup
	results := make([]MoveResult, len(ps))
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = b.SrcAgent.Move(t, p.PID, b.DstAgent)
		}()
	}
	wg.Wait()
	moved := 0
	for i, p := range ps {
		r := results[i]
		if r.Err == nil {
			moved++
			continue
		}
		if r.Last.FailedPhase != "prepare" || !strings.Contains(r.Last.Error, "too many concurrent migrations") {
			t.Fatalf("move %d of pid %d: %v %s", i, p.PID, r.Err, r.Last.Error)
		}
		t.Logf("move %d refused as the user sees it: %s", i, r.Last.Error)
		assertRunsOnSource(t, b, p, befores[i])
		if r := b.SrcAgent.Move(t, p.PID, b.DstAgent); r.Err != nil {
			t.Fatalf("retry of pid %d: %v %s", p.PID, r.Err, r.Last.Error)
		}
	}
	if moved < min(limit, len(ps)) {
		t.Fatalf("only %d of %d concurrent moves went through with %d allowed at a time", moved, len(ps), limit)
	}
	t.Logf("%d moves went through at once, %d after a retry", moved, len(ps)-moved)
	for i, p := range ps {
		q := p.On(b.B)
		WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > befores[i].Counter }, 30*time.Second)
		if v := Verify(t, q); v.Verify != "ok" {
			t.Fatalf("pid %d memory not intact: %+v", p.PID, v)
		}
	}
	assertNoLeftovers(t, b)
}
