package criurpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/migrated/migrated/test/e2e"
)

// These tests run the real CRIU on processes in the test's own namespaces.
// Restores reuse the dumped PID, which is free again once the dumped
// process was killed and reaped.

// testClient returns a Client that logs to the test.
func testClient(t *testing.T) *Client {
	t.Helper()
	return New(
		WithPath(e2e.RequireCRIU(t)),
		WithLogger(hclog.New(&hclog.LoggerOptions{Name: "criu", Level: hclog.Debug, Output: testWriter{t}})),
	)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// workload is memhog running in the test's namespaces as its own session.
type workload struct {
	pid    int
	status string
	cmd    *exec.Cmd // nil once the process is no longer the test's child
}

// startWorkload starts memhog with mib MiB of checked memory and waits for
// its first status. Cleanup kills it, and its restored copies.
func startWorkload(t *testing.T, mib int, extra ...string) *workload {
	t.Helper()
	dir := t.TempDir()
	w := &workload{status: filepath.Join(dir, "status")}
	args := append([]string{"--mem", strconv.Itoa(mib), "--hot", "1", "--status", w.status}, extra...)
	cmd := exec.Command(e2e.MemhogBinary(t), args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.cmd, w.pid = cmd, cmd.Process.Pid
	t.Cleanup(func() { w.kill(t) })
	w.wait(t, "first status", func(s e2e.WorkloadStatus) bool { return s.PID == w.pid && s.Counter > 0 })
	return w
}

// kill kills the workload (the original or its restored copy, which has the
// same PID) and reaps it when it is the test's child.
func (w *workload) kill(t *testing.T) {
	if w.cmd != nil {
		KillTree(w.pid) // children first: they would outlive memhog
		w.cmd.Process.Kill()
		w.cmd.Wait()
		w.cmd = nil
		return
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", w.pid)); err == nil && strings.TrimSpace(string(comm)) == "memhog" {
		if err := KillTree(w.pid); err != nil {
			t.Logf("kill restored workload %d: %v", w.pid, err)
		}
	}
}

// reap waits for the original process after CRIU killed it.
func (w *workload) reap(t *testing.T) {
	t.Helper()
	if w.cmd == nil {
		t.Fatal("workload is not the test's child")
	}
	w.cmd.Wait()
	w.cmd = nil
}

func (w *workload) read() (e2e.WorkloadStatus, error) {
	b, err := os.ReadFile(w.status)
	if err != nil {
		return e2e.WorkloadStatus{}, err
	}
	return e2e.ParseWorkloadStatus(b)
}

// wait polls the status file until cond holds; it fails the test after a
// minute, which only a broken workload or CRIU takes.
func (w *workload) wait(t *testing.T, what string, cond func(e2e.WorkloadStatus) bool) e2e.WorkloadStatus {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		s, err := w.read()
		if err == nil && cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %d: %s: not reached (last status %+v, %v)", w.pid, what, s, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// verify makes memhog recheck its memory and fails the test unless it is
// intact and the process runs (a stopped process does not answer).
func (w *workload) verify(t *testing.T) e2e.WorkloadStatus {
	t.Helper()
	before, err := w.read()
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(w.pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("signal workload %d: %v", w.pid, err)
	}
	s := w.wait(t, "verification", func(s e2e.WorkloadStatus) bool { return s.VerifyCount > before.VerifyCount })
	if s.Verify != "ok" || s.ColdSumNow != s.ColdSum {
		t.Fatalf("workload %d memory changed: verify=%s, checksum %s, at start %s", w.pid, s.Verify, s.ColdSumNow, s.ColdSum)
	}
	return s
}

// state returns the process state letter from /proc/PID/stat, 0 when the
// process does not exist.
func procState(pid int) (state byte, ppid int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return 0, 0
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 2 {
		return 0, 0
	}
	ppid, _ = strconv.Atoi(f[1])
	return f[0][0], ppid
}

// waitStopped waits until pid is stopped. A LeaveStopped dump returns
// once CRIU detached the tree with SIGSTOP pending: each task stops before
// it runs any code of its own, but its state may read R for a moment.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		st, _ := procState(pid)
		if st == 'T' {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d has state %c, want T (stopped)", pid, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// requireGone fails the test when pid is a zombie child of the test or
// still runs.
func requireGone(t *testing.T, pid int, what string) {
	t.Helper()
	if st, ppid := procState(pid); st != 0 && ppid == os.Getpid() {
		t.Fatalf("%s (PID %d) still exists with state %c as the test's child", what, pid, st)
	}
}

func TestVersionAndProbe(t *testing.T) {
	c := testClient(t)
	ctx := t.Context()
	out, err := exec.Command(c.path(), "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "Version: "+v.String()) {
		t.Fatalf("Version() = %s, criu --version says %q", v, out)
	}
	caps, err := c.Probe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if caps.Version != v || caps.PageServerHeaderSize != v.PageServerHeaderSize() || caps.SoftDirty != caps.Features.MemTrack {
		t.Fatalf("Probe() = %+v, Version() = %+v", caps, v)
	}
	if !v.AtLeast(4, 2) || caps.PageServerHeaderSize != 32 {
		t.Fatalf("criu %s, header %d: the tests need CRIU >= 4.2 (32-byte headers)", v, caps.PageServerHeaderSize)
	}
	// The features are CRIU's answers: they agree with `criu check`.
	cliFeature := func(name string) bool {
		return exec.Command(c.path(), "check", "--feature", name).Run() == nil
	}
	f, err := c.FeatureCheck(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if f != caps.Features {
		t.Fatalf("FeatureCheck() = %+v, Probe() features %+v", f, caps.Features)
	}
	if want := cliFeature("mem_dirty_track"); f.MemTrack != want {
		t.Fatalf("MemTrack %v, criu check --feature mem_dirty_track says %v", f.MemTrack, want)
	}
	if want := cliFeature("uffd-noncoop"); f.LazyPages != want {
		t.Fatalf("LazyPages %v, criu check --feature uffd-noncoop says %v", f.LazyPages, want)
	}
	t.Logf("criu %s: %+v", v, caps)
}

func TestCheckAndCPUInfo(t *testing.T) {
	c := testClient(t)
	ctx := t.Context()
	if err := c.Check(ctx); err != nil {
		t.Fatalf("Check: %v", err)
	}
	dir := t.TempDir()
	if err := c.CPUInfoDump(ctx, CPUInfoOptions{ImagesDir: dir}); err != nil {
		t.Fatalf("CPUInfoDump: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "cpuinfo.img")); err != nil {
		t.Fatal(err)
	}
	if err := c.CPUInfoCheck(ctx, CPUInfoOptions{ImagesDir: dir}); err != nil {
		t.Fatalf("CPUInfoCheck on the same host: %v", err)
	}
	err := c.CPUInfoCheck(ctx, CPUInfoOptions{ImagesDir: t.TempDir()})
	var e *Error
	if !errors.As(err, &e) || e.Op != "cpuinfo-check" || e.Msg == "" {
		t.Fatalf("CPUInfoCheck without cpuinfo.img: %#v", err)
	}
	t.Logf("without cpuinfo.img: %v", err)
}

func TestDumpLeaveStoppedRestore(t *testing.T) {
	c := testClient(t)
	ctx := t.Context()
	w := startWorkload(t, 16)
	before := w.verify(t)
	dir := t.TempDir()

	var stages []Stage
	n := NotifyFunc(func(_ context.Context, n Notification) error {
		stages = append(stages, n.Stage)
		return nil
	})
	st, err := c.Dump(ctx, DumpOptions{ImagesDir: dir, PID: w.pid, LeaveStopped: true}, n)
	if err != nil {
		t.Fatal(err)
	}
	waitStopped(t, w.pid)
	if st == nil || st.PagesWritten < 16*256 || st.PagesScanned < st.PagesWritten || st.FrozenTime <= 0 {
		t.Fatalf("dump stats %+v", st)
	}
	if !containsStage(stages, StagePreDump) || !containsStage(stages, StagePostDump) {
		t.Fatalf("dump notifications %v lack pre-dump or post-dump", stages)
	}
	frozen, err := w.read()
	if err != nil {
		t.Fatal(err)
	}

	// The frozen source goes away; its copy comes back with the same PID.
	if err := KillTree(w.pid); err != nil {
		t.Fatal(err)
	}
	w.reap(t)
	stages = nil
	res, err := c.Restore(ctx, RestoreOptions{ImagesDir: dir}, n)
	if err != nil {
		t.Fatal(err)
	}
	if res.PID != w.pid {
		t.Fatalf("restored PID %d, want %d", res.PID, w.pid)
	}
	if res.Stats == nil || res.Stats.PagesRestored < 16*256 || res.Stats.RestoreTime <= 0 {
		t.Fatalf("restore stats %+v", res.Stats)
	}
	for _, s := range []Stage{StagePreRestore, StagePostRestore, StagePreResume, StagePostResume} {
		if !containsStage(stages, s) {
			t.Fatalf("restore notifications %v lack %s", stages, s)
		}
	}
	// CRIU has exited; the restored process is not the test's child.
	if _, ppid := procState(res.PID); ppid == os.Getpid() || ppid == 0 {
		t.Fatalf("restored process has parent %d (test is %d)", ppid, os.Getpid())
	}
	w.wait(t, "counter continues", func(s e2e.WorkloadStatus) bool { return s.Counter > frozen.Counter+50 })
	after := w.verify(t)
	if after.ColdSum != before.ColdSum {
		t.Fatalf("checksum %s after restore, %s before", after.ColdSum, before.ColdSum)
	}
	t.Logf("dump %+v; restore %+v", *st, *res.Stats)
}

func containsStage(stages []Stage, s Stage) bool {
	for _, x := range stages {
		if x == s {
			return true
		}
	}
	return false
}

func TestDumpLeaveStoppedResumeTree(t *testing.T) {
	c := testClient(t)
	w := startWorkload(t, 4, "--children", "2")
	if _, err := c.Dump(t.Context(), DumpOptions{ImagesDir: t.TempDir(), PID: w.pid, LeaveStopped: true}, nil); err != nil {
		t.Fatal(err)
	}
	pids, err := TreePIDs(w.pid)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 3 {
		t.Fatalf("tree %v, want memhog and 2 children", pids)
	}
	for _, p := range pids {
		waitStopped(t, p)
	}
	frozen, err := w.read()
	if err != nil {
		t.Fatal(err)
	}
	if err := ResumeTree(w.pid); err != nil {
		t.Fatal(err)
	}
	s := w.wait(t, "tree resumed", func(s e2e.WorkloadStatus) bool {
		if s.Counter <= frozen.Counter+50 || len(s.ChildCount) != 2 {
			return false
		}
		for i, n := range s.ChildCount {
			if n <= frozen.ChildCount[i] {
				return false
			}
		}
		return true
	})
	t.Logf("resumed: counter %d -> %d, children %v -> %v", frozen.Counter, s.Counter, frozen.ChildCount, s.ChildCount)
}

func TestPreDumpWithoutSoftDirty(t *testing.T) {
	c := testClient(t)
	ctx := t.Context()
	caps, err := c.Probe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := startWorkload(t, 4)
	dir := t.TempDir()
	s, err := c.PreDump(ctx, DumpOptions{ImagesDir: dir, PID: w.pid}, nil)
	if caps.SoftDirty {
		// A kernel with soft-dirty tracking: pre-dump works and the tree
		// keeps running.
		if err != nil {
			t.Fatalf("pre-dump with soft-dirty tracking: %v", err)
		}
		s.Close()
		w.verify(t)
		return
	}
	if !errors.Is(err, ErrNoMemTracking) {
		t.Fatalf("pre-dump on a kernel without soft-dirty: %v, want ErrNoMemTracking", err)
	}
	if !strings.Contains(err.Error(), "soft-dirty") || !strings.Contains(err.Error(), fmt.Sprintf("pre-dump of pid %d", w.pid)) {
		t.Fatalf("error does not say why: %q", err)
	}
	t.Logf("pre-dump refused: %v", err)
	// So is a dump that would track memory for a later incremental dump.
	_, err = c.Dump(ctx, DumpOptions{ImagesDir: dir, PID: w.pid, TrackMem: true}, nil)
	if !errors.Is(err, ErrNoMemTracking) {
		t.Fatalf("dump with TrackMem on a kernel without soft-dirty: %v, want ErrNoMemTracking", err)
	}

	// CRIU itself, asked with track_mem, refuses cleanly too (instead of
	// aborting), and the error carries its message.
	raw := *c
	raw.skipMemTrackCheck = true
	_, err = raw.PreDump(ctx, DumpOptions{ImagesDir: dir, PID: w.pid}, nil)
	var e *Error
	if !errors.As(err, &e) || e.Msg == "" || errors.Is(err, ErrCRIUExited) {
		t.Fatalf("CRIU's own pre-dump refusal: %#v", err)
	}
	t.Logf("CRIU's refusal: %v", err)
	w.verify(t)
}

func TestPostDumpFailureResumesTree(t *testing.T) {
	c := testClient(t)
	w := startWorkload(t, 8)
	hookErr := errors.New("destination not ready")
	_, err := c.Dump(t.Context(), DumpOptions{ImagesDir: t.TempDir(), PID: w.pid, LeaveStopped: true},
		&Hooks{PostDump: func(context.Context) error { return hookErr }})
	if !errors.Is(err, ErrNotifyFailed) || !errors.Is(err, hookErr) {
		t.Fatalf("dump with failing post-dump: %v", err)
	}
	t.Logf("dump failed as asked: %v", err)
	if st, _ := procState(w.pid); st == 'T' || st == 't' || st == 0 {
		t.Fatalf("source has state %c after the failed dump; want it running", st)
	}
	s, _ := w.read()
	w.wait(t, "source keeps running", func(x e2e.WorkloadStatus) bool { return x.Counter > s.Counter+50 })
	w.verify(t)
}

func TestCRIUKilledMidDump(t *testing.T) {
	// Killed before the freeze and while the tree is frozen: either way
	// the dump fails, CRIU is reaped, and the tree runs on.
	for _, stage := range []Stage{StagePreDump, StagePostDump} {
		t.Run(string(stage), func(t *testing.T) {
			c := testClient(t)
			w := startWorkload(t, 8)
			var criuPID int
			n := NotifyFunc(func(ctx context.Context, n Notification) error {
				if n.Stage == stage {
					criuPID = n.CRIUPID
					return syscall.Kill(n.CRIUPID, syscall.SIGKILL)
				}
				return nil
			})
			_, err := c.Dump(t.Context(), DumpOptions{ImagesDir: t.TempDir(), PID: w.pid, LeaveStopped: true}, n)
			if !errors.Is(err, ErrCRIUExited) {
				t.Fatalf("dump with CRIU killed: %v, want ErrCRIUExited", err)
			}
			if !strings.Contains(err.Error(), "signal: killed") {
				t.Fatalf("error does not say CRIU was killed: %v", err)
			}
			t.Logf("dump with CRIU killed: %v", err)
			requireGone(t, criuPID, "killed CRIU")
			s, _ := w.read()
			w.wait(t, "tree runs on", func(x e2e.WorkloadStatus) bool { return x.Counter > s.Counter+50 })
			w.verify(t)
		})
	}
}

func TestContextCancelledMidDump(t *testing.T) {
	c := testClient(t)
	w := startWorkload(t, 8)
	ctx, cancel := context.WithCancel(t.Context())
	var criuPID int
	n := NotifyFunc(func(ctx context.Context, n Notification) error {
		if n.Stage == StagePreDump {
			criuPID = n.CRIUPID
			cancel()
			<-ctx.Done()
		}
		return nil
	})
	_, err := c.Dump(ctx, DumpOptions{ImagesDir: t.TempDir(), PID: w.pid}, n)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("dump with context cancelled: %v", err)
	}
	requireGone(t, criuPID, "CRIU of a cancelled dump")
	w.verify(t)
}

func TestDumpErrorExplainsWhy(t *testing.T) {
	c := testClient(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			accepted <- conn
		}
		close(accepted)
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	cmd := exec.Command("bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d; exec sleep 1000", port))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if conn := <-accepted; conn != nil {
		defer conn.Close()
	} else {
		t.Fatal("no connection")
	}
	// Wait until bash has exec'ed sleep, which keeps the connection.
	deadline := time.Now().Add(time.Minute)
	for {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		if strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("bash did not exec sleep")
		}
		time.Sleep(5 * time.Millisecond)
	}

	_, err = c.Dump(t.Context(), DumpOptions{ImagesDir: t.TempDir(), PID: cmd.Process.Pid}, nil)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("dump of a process with a TCP connection: %v", err)
	}
	want := fmt.Sprintf("dump of pid %d failed: ", cmd.Process.Pid)
	if !strings.HasPrefix(err.Error(), want) || !strings.Contains(e.Msg, "--tcp-established") {
		t.Fatalf("Error() = %q; want %q… naming --tcp-established", err, want)
	}
	if len(e.LogTail) == 0 {
		t.Fatal("no log tail")
	}
	for _, l := range e.LogTail {
		if strings.Contains(l, "RLIMIT_NOFILE") {
			t.Fatalf("log tail keeps the harmless rlimit line: %q", e.LogTail)
		}
	}
	t.Logf("%v\nlog tail:\n%s", err, strings.Join(e.LogTail, "\n"))
	if st, _ := procState(cmd.Process.Pid); st == 'T' || st == 0 {
		t.Fatalf("process state %c after a failed dump", st)
	}
}

// socketpair returns two connected stream sockets.
func socketpair(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "ps-a"), os.NewFile(uintptr(fds[1]), "ps-b")
}

// copyMissing copies the files of src that dst lacks into dst.
func copyMissing(t *testing.T, src, dst string) {
	t.Helper()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dst, e.Name())); err == nil {
			continue
		}
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPageServerImagesCompleteAfterWait(t *testing.T) {
	for _, tc := range []struct {
		name string
		conn bool
	}{{"passed socket", true}, {"tcp", false}} {
		t.Run(tc.name, func(t *testing.T) {
			c := testClient(t)
			ctx := t.Context()
			w := startWorkload(t, 32)
			before := w.verify(t)
			dumpDir, psDir := t.TempDir(), t.TempDir()

			po := PageServerOptions{ImagesDir: psDir}
			target := &PageServerTarget{}
			if tc.conn {
				a, b := socketpair(t)
				defer a.Close()
				po.Conn, target.Conn = b, a
			} else {
				po.Address = "127.0.0.1"
			}
			ps, err := c.StartPageServer(ctx, po)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ps.Kill() }) // no-op after Wait
			if po.Conn != nil {
				po.Conn.Close()
			}
			if ps.PID <= 0 || (!tc.conn && ps.Port <= 0) {
				t.Fatalf("page server %+v", ps)
			}
			if !tc.conn {
				target.Address, target.Port = "127.0.0.1", ps.Port
			}
			st, err := c.Dump(ctx, DumpOptions{ImagesDir: dumpDir, PID: w.pid, PageServer: target}, nil)
			if err != nil {
				t.Fatal(err)
			}
			w.reap(t) // CRIU killed it after the dump
			if err := ps.Wait(ctx); err != nil {
				t.Fatalf("page server: %v", err)
			}
			if err := ps.Wait(ctx); err != nil {
				t.Fatalf("second Wait: %v", err)
			}
			requireGone(t, ps.PID, "page server")
			if m, _ := filepath.Glob(filepath.Join(dumpDir, "pages-*.img")); len(m) != 0 {
				t.Fatalf("dump wrote pages locally: %v", m)
			}
			// The page server's pagemap and pages plus the dump's other
			// images make a complete set.
			copyMissing(t, dumpDir, psDir)
			res, err := c.Restore(ctx, RestoreOptions{ImagesDir: psDir}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.PID != w.pid {
				t.Fatalf("restored PID %d, want %d", res.PID, w.pid)
			}
			after := w.verify(t)
			if after.ColdSum != before.ColdSum {
				t.Fatalf("checksum %s after restore, %s before", after.ColdSum, before.ColdSum)
			}
			t.Logf("pages written %d through the page server; restored %d", st.PagesWritten, res.Stats.PagesRestored)
		})
	}
}

func TestPageServerKill(t *testing.T) {
	c := testClient(t)
	ps, err := c.StartPageServer(t.Context(), PageServerOptions{ImagesDir: t.TempDir(), Address: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := procState(ps.PID); st == 0 {
		t.Fatalf("page server %d not running", ps.PID)
	}
	if err := ps.Kill(); err != nil {
		t.Fatal(err)
	}
	if st, _ := procState(ps.PID); st != 0 {
		t.Fatalf("page server %d has state %c after Kill", ps.PID, st)
	}
	// Wait after Kill reports that the page server did not finish.
	if err := ps.Wait(t.Context()); err == nil {
		t.Fatal("Wait after Kill reported success")
	}
	// Nothing listens any more.
	if conn, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(ps.Port))); err == nil {
		conn.Close()
		t.Fatalf("port %d still accepts connections", ps.Port)
	}
}

func TestRestoreSibling(t *testing.T) {
	c := testClient(t)
	ctx := t.Context()
	w := startWorkload(t, 4)
	dir := t.TempDir()
	if _, err := c.Dump(ctx, DumpOptions{ImagesDir: dir, PID: w.pid}, nil); err != nil {
		t.Fatal(err)
	}
	w.reap(t) // CRIU killed it after the dump
	res, err := c.Restore(ctx, RestoreOptions{ImagesDir: dir, Sibling: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The restored root is the caller's child, which must reap it.
	if _, ppid := procState(res.PID); ppid != os.Getpid() {
		t.Fatalf("restored process has parent %d, want the test (%d)", ppid, os.Getpid())
	}
	w.verify(t)
	if err := syscall.Kill(res.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(res.PID, &ws, 0, nil); err != nil || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("reap restored child: %v, %v", ws, err)
	}
}

// TestNetworkLockLeftByStoppedDump dumps a process holding a TCP socket
// with TCPEstablished and the nftables lock, leaving it stopped: CRIU
// keeps its lock table, named after the dump's run id, and UnlockNetwork
// removes it.
func TestNetworkLockLeftByStoppedDump(t *testing.T) {
	e2e.RequireNFT(t)
	c := testClient(t)
	w := startWorkload(t, 8, "--listen", "47125")
	dir := t.TempDir()
	if _, err := c.Dump(t.Context(), DumpOptions{ImagesDir: dir, PID: w.pid, LeaveStopped: true,
		TCPEstablished: true, NetworkLock: NetworkLockNFTables}, nil); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(w.pid, syscall.SIGCONT)
	id, err := DumpRunID(dir)
	if err != nil {
		t.Fatal(err)
	}
	table := NetworkLockTable(id)
	t.Cleanup(func() { _ = exec.Command("nft", "delete", "table", "inet", table).Run() })
	if out, err := exec.Command("nft", "list", "table", "inet", table).CombinedOutput(); err != nil {
		t.Fatalf("no lock table %s after the dump: %v: %s", table, err, out)
	}
	if err := UnlockNetwork(t.Context(), id); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nft", "list", "table", "inet", table).CombinedOutput(); err == nil {
		t.Fatalf("lock table %s still there after UnlockNetwork: %s", table, out)
	}
	if err := UnlockNetwork(t.Context(), id); err != nil {
		t.Fatalf("unlocking twice: %v", err)
	}
}
