package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// criuCLI runs the criu binary inside h with images in dir, logging to
// dir/log at full verbosity; on failure it fails the test with the log's tail.
func criuCLI(t *testing.T, h *Host, criu, dir, log string, args ...string) {
	t.Helper()
	args = append(args, "-D", dir, "-o", log, "-v4")
	out, err := h.Command(t.Context(), criu, args...).CombinedOutput()
	if err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, log))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		t.Fatalf("%s: criu %s: %v\n%s\n%s tail:\n%s", h.Name, strings.Join(args, " "), err, out, log, strings.Join(lines, "\n"))
	}
}

// waitGone waits until p no longer exists in its host.
func waitGone(t *testing.T, p *Proc) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := p.Info(); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s PID %d still exists", p.Host.Name, p.PID)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// moveWithCRIU checkpoints p in its host with the criu CLI (--leave-stopped),
// restores it in dst while the original stays frozen, and checks what holds
// for every workload: the original is frozen, the copy has the same PID, its
// counter continues from where it stopped, and its memory is intact. It
// returns the restored process and its first status after the restore; the
// frozen original is still there.
func moveWithCRIU(t *testing.T, criu string, p *Proc, dst *Host) (*Proc, WorkloadStatus) {
	t.Helper()
	src := p.Host
	WaitStatus(t, p, func(s WorkloadStatus) bool { return s.Counter >= 300 }, time.Minute)
	before := Verify(t, p)
	ResetGap(t, p)
	WaitStatus(t, p, func(s WorkloadStatus) bool { return s.MaxGap < time.Second && s.Counter > before.Counter+5 }, time.Minute)

	img := filepath.Join(src.Dir, "img")
	if err := os.Mkdir(img, 0o755); err != nil {
		t.Fatal(err)
	}
	criuCLI(t, src, criu, img, "dump.log", "dump", "-t", strconv.Itoa(p.PID), "--leave-stopped")
	dumped := time.Now()

	info, err := p.Info()
	if err != nil {
		t.Fatalf("original after dump: %v", err)
	}
	if info.State != 'T' {
		t.Fatalf("original after dump --leave-stopped: state %c, want T (stopped)", info.State)
	}
	frozen, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.Process(p.PID); err == nil {
		t.Fatalf("%s already has a PID %d before the restore", dst.Name, p.PID)
	}

	restoreStart := time.Now()
	criuCLI(t, dst, criu, img, "restore.log", "restore", "-d")
	q := p.On(dst)

	// The original is still there, still frozen.
	if info, err := p.Info(); err != nil || info.State != 'T' {
		t.Fatalf("original in %s after the restore: %+v, %v; want it frozen", src.Name, info, err)
	}
	qi, err := q.Info()
	if err != nil {
		t.Fatalf("restored process in %s: %v", dst.Name, err)
	}
	if qi.Comm != info.Comm || qi.SID != p.PID {
		t.Fatalf("restored process in %s: %+v; want comm %s, session %d", dst.Name, qi, info.Comm, p.PID)
	}

	// The first status written after the restore continues the counter.
	first := WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Time.After(restoreStart) }, time.Minute)
	if first.PID != p.PID {
		t.Fatalf("restored workload reports getpid()=%d, want %d", first.PID, p.PID)
	}
	if first.Counter < frozen.Counter {
		t.Fatalf("counter went back from %d to %d: the workload restarted instead of continuing", frozen.Counter, first.Counter)
	}
	WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > first.Counter+50 }, time.Minute)
	after := Verify(t, q)
	if after.ColdSum != before.ColdSum {
		t.Fatalf("cold checksum at start differs after the move: %s, was %s", after.ColdSum, before.ColdSum)
	}
	// The workload was frozen at least from the dump's end to the restore's
	// start, so its wall clock must show a gap at least that long.
	if frozenFor := restoreStart.Sub(dumped); after.MaxGap < frozenFor {
		t.Fatalf("largest gap seen by the workload %v < time it was certainly frozen %v", after.MaxGap, frozenFor)
	}
	t.Logf("moved %s PID %d to %s: counter %d -> %d, largest gap %v", src.Name, p.PID, dst.Name, frozen.Counter, first.Counter, after.MaxGap)
	return q, first
}

func TestCRIUCheckpointRestoreAcrossHosts(t *testing.T) {
	criu := RequireCRIU(t)
	for _, tc := range []struct {
		name string
		opts func(h *Host) MemhogOptions
	}{
		{"memory", func(*Host) MemhogOptions { return MemhogOptions{MemMiB: 64, HotMiB: 8} }},
		{"compressible", func(*Host) MemhogOptions { return MemhogOptions{MemMiB: 32, HotMiB: 4, Compressible: true} }},
		{"tree", func(h *Host) MemhogOptions {
			return MemhogOptions{MemMiB: 16, Children: 2, Pipe: true, File: filepath.Join(h.Shared, "memhog.log")}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs := NewHosts(t, 2)
			a, b := hs[0], hs[1]
			o := tc.opts(a)
			p := StartMemhog(t, a, o)
			if p.PID < a.FirstPID || p.PID >= b.FirstPID {
				t.Fatalf("memhog in %s has PID %d, outside %d..%d", a.Name, p.PID, a.FirstPID, b.FirstPID-1)
			}
			start, _ := p.Status()
			q, first := moveWithCRIU(t, criu, p, b)

			if o.Children > 0 {
				if !equalInts(first.Children, start.Children) {
					t.Fatalf("children after restore %v, before %v", first.Children, start.Children)
				}
				for _, c := range first.Children {
					ci, err := b.Process(c)
					if err != nil || ci.PPID != p.PID {
						t.Fatalf("child %d in %s: %+v, %v; want a child of %d", c, b.Name, ci, err, p.PID)
					}
				}
				frozen := first.ChildCount
				s := WaitStatus(t, q, func(s WorkloadStatus) bool {
					for i := range s.ChildCount {
						if s.ChildCount[i] <= frozen[i]+20 {
							return false
						}
					}
					return true
				}, time.Minute)
				t.Logf("child counters %v -> %v", frozen, s.ChildCount)
			}
			if o.Pipe {
				s := WaitStatus(t, q, func(s WorkloadStatus) bool { return s.PipeSeq > first.PipeSeq+50 }, time.Minute)
				if s.PipeErrors != 0 {
					t.Fatalf("pipe lost or repeated %d sequence numbers", s.PipeErrors)
				}
			}
			if o.File != "" {
				WaitStatus(t, q, func(s WorkloadStatus) bool { return s.FileLines > first.FileLines }, time.Minute)
			}

			if err := p.Kill(); err != nil {
				t.Fatalf("kill frozen original: %v", err)
			}
			waitGone(t, p)
			s := WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Counter > first.Counter+100 }, time.Minute)
			t.Logf("after killing the original: counter %d in %s", s.Counter, b.Name)
		})
	}
}

func TestCRIUListeningSocketAcrossHosts(t *testing.T) {
	criu := RequireCRIU(t)
	hs := NewHosts(t, 2)
	a, b := hs[0], hs[1]
	const port = 7070
	p := StartMemhog(t, a, MemhogOptions{MemMiB: 16, Listen: port})

	n0 := tcpCounter(t, b, a.IP, port)
	q, _ := moveWithCRIU(t, criu, p, b)
	if err := p.Kill(); err != nil {
		t.Fatalf("kill frozen original: %v", err)
	}
	waitGone(t, p)

	n1 := tcpCounter(t, a, b.IP, port)
	if n1 <= n0 {
		t.Fatalf("counter over TCP from %s: %d after the move, %d before", b.Name, n1, n0)
	}
	// The restored copy counts both connections: the one before the move
	// (in its memory) and the one after.
	WaitStatus(t, q, func(s WorkloadStatus) bool { return s.Conns >= 2 }, time.Minute)
	// Only the restored copy listens now.
	if out, err := tcpDial(t, b, a.IP, port); err == nil {
		t.Fatalf("%s:%d still answers after the original was killed: %q", a.IP, port, out)
	}
}

// tcpDial connects from host h to ip:port and returns what the server sends.
func tcpDial(t *testing.T, h *Host, ip string, port int) (string, error) {
	t.Helper()
	out, err := h.Command(t.Context(), "timeout", "10", "bash", "-c",
		"exec 3<>/dev/tcp/"+ip+"/"+strconv.Itoa(port)+" && cat <&3").CombinedOutput()
	return string(out), err
}

// tcpCounter asks memhog --listen at ip:port, from host h, for its counter.
func tcpCounter(t *testing.T, h *Host, ip string, port int) uint64 {
	t.Helper()
	out, err := tcpDial(t, h, ip, port)
	if err != nil {
		t.Fatalf("%s: connect to %s:%d: %v: %s", h.Name, ip, port, err, out)
	}
	v, ok := strings.CutPrefix(strings.TrimSpace(out), "counter=")
	n, err := strconv.ParseUint(v, 10, 64)
	if !ok || err != nil {
		t.Fatalf("%s: %s:%d answered %q", h.Name, ip, port, out)
	}
	return n
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestCRIUGoThreadsAcrossHosts(t *testing.T) {
	criu := RequireCRIU(t)
	hs := NewHosts(t, 2)
	a, b := hs[0], hs[1]
	p := StartGoThreads(t, a, GoThreadsOptions{Threads: 4, MemMiB: 16})
	if info, err := p.Info(); err != nil || info.Threads < 5 {
		t.Fatalf("gothreads: %+v, %v; want at least 5 threads", info, err)
	}
	q, first := moveWithCRIU(t, criu, p, b)
	if len(first.ThreadCount) != 4 {
		t.Fatalf("thread counters after restore: %v", first.ThreadCount)
	}
	// Every thread keeps counting in the new host.
	s := WaitStatus(t, q, func(s WorkloadStatus) bool {
		for i := range s.ThreadCount {
			if s.ThreadCount[i] <= first.ThreadCount[i]+20 {
				return false
			}
		}
		return true
	}, time.Minute)
	t.Logf("thread counters %v -> %v", first.ThreadCount, s.ThreadCount)
	if info, err := q.Info(); err != nil || info.Threads < 5 {
		t.Fatalf("restored gothreads: %+v, %v; want at least 5 threads", info, err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, p)
}
