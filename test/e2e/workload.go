package e2e

import (
	_ "embed"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

//go:embed workload/memhog/memhog.c
var memhogSource []byte

// ErrNoStatus means the workload has not written its status file yet.
var ErrNoStatus = errors.New("workload status file not written yet")

// WorkloadStatus is the content of a workload's status file: key=value lines
// that memhog and gothreads rewrite atomically about every 20 ms.
type WorkloadStatus struct {
	PID         int           // getpid() as the workload's host sees it
	Counter     uint64        // ticks (about 1 ms each) counted so far; a restore continues it
	MaxGap      time.Duration // largest wall-clock gap between two ticks (since start or the last ResetGap)
	Time        time.Time     // wall-clock time of this status
	MemMiB      int           // memory touched
	HotMiB      int           // part of it rewritten continuously
	ColdSum     string        // checksum of the cold memory, computed once at start
	Verify      string        // "none" (never verified), "ok" or "bad"
	VerifyCount int           // number of verifications done
	ColdSumNow  string        // checksum found by the last verification
	Conns       int           // TCP connections answered (memhog --listen)
	FileLines   int           // lines appended to the --file file
	PipePID     int           // host PID of the pipe writer child (memhog --pipe), 0 without
	PipeSeq     uint64        // last sequence number received through the pipe
	PipeErrors  int           // sequence numbers lost or repeated
	Children    []int         // host PIDs of counting children (memhog --children)
	ChildCount  []uint64      // their counters
	Threads     int           // counting threads (gothreads)
	ThreadCount []uint64      // their counters (gothreads)
	Raw         map[string]string
}

// ParseWorkloadStatus parses a status file's content.
func ParseWorkloadStatus(b []byte) (WorkloadStatus, error) {
	s := WorkloadStatus{Raw: make(map[string]string)}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return s, fmt.Errorf("status line %q: no '='", line)
		}
		s.Raw[k] = v
	}
	var err error
	num := func(k string) int64 {
		v, ok := s.Raw[k]
		if !ok || err != nil {
			return 0
		}
		n, e := strconv.ParseInt(v, 10, 64)
		if e != nil {
			err = fmt.Errorf("status %s=%q: %w", k, v, e)
		}
		return n
	}
	list := func(k string) []uint64 {
		v := s.Raw[k]
		if v == "" || err != nil {
			return nil
		}
		var out []uint64
		for _, f := range strings.Split(v, ",") {
			n, e := strconv.ParseUint(f, 10, 64)
			if e != nil {
				err = fmt.Errorf("status %s=%q: %w", k, v, e)
				return nil
			}
			out = append(out, n)
		}
		return out
	}
	if _, ok := s.Raw["pid"]; !ok {
		return s, fmt.Errorf("status: no pid line")
	}
	s.PID = int(num("pid"))
	s.Counter = uint64(num("counter"))
	s.MaxGap = time.Duration(num("max_gap_us")) * time.Microsecond
	if us := num("time_us"); us > 0 {
		s.Time = time.UnixMicro(us)
	}
	s.MemMiB = int(num("mem_mib"))
	s.HotMiB = int(num("hot_mib"))
	s.ColdSum = s.Raw["cold_sum"]
	s.Verify = s.Raw["verify"]
	s.VerifyCount = int(num("verify_count"))
	s.ColdSumNow = s.Raw["cold_sum_now"]
	s.Conns = int(num("conns"))
	s.FileLines = int(num("file_lines"))
	s.PipePID = int(num("pipe_pid"))
	s.PipeSeq = uint64(num("pipe_seq"))
	s.PipeErrors = int(num("pipe_errors"))
	for _, c := range list("children") {
		s.Children = append(s.Children, int(c))
	}
	s.ChildCount = list("child_counters")
	s.Threads = int(num("threads"))
	s.ThreadCount = list("thread_counters")
	return s, err
}

// Status reads the process's status file (Proc.StatusFile). It returns an
// error wrapping ErrNoStatus before the workload wrote its first status.
func (p *Proc) Status() (WorkloadStatus, error) {
	if p.StatusFile == "" {
		return WorkloadStatus{}, fmt.Errorf("%s PID %d: no status file", p.Host.Name, p.PID)
	}
	b, err := os.ReadFile(p.StatusFile)
	if errors.Is(err, os.ErrNotExist) {
		return WorkloadStatus{}, fmt.Errorf("%s: %w", p.StatusFile, ErrNoStatus)
	}
	if err != nil {
		return WorkloadStatus{}, err
	}
	return ParseWorkloadStatus(b)
}

// WaitStatus polls p's status file until cond holds and returns that status;
// it fails the test after timeout (showing the last status and the
// workload's stderr). The timeout bounds a wait for progress and is no
// measure of speed: give it generous room.
func WaitStatus(t testing.TB, p *Proc, cond func(WorkloadStatus) bool, timeout time.Duration) WorkloadStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last WorkloadStatus
	var lastErr error
	for {
		s, err := p.Status()
		if err == nil {
			last = s
			if cond(s) {
				return s
			}
		}
		lastErr = err
		if time.Now().After(deadline) {
			stderr, _ := os.ReadFile(p.Stderr)
			t.Fatalf("%s PID %d: status condition not met within %v; last status %+v (err %v); stderr: %s",
				p.Host.Name, p.PID, timeout, last.Raw, lastErr, stderr)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Verify makes the workload recompute the checksum of its cold memory
// (SIGUSR1 to p in p.Host), waits for the answer and fails the test unless the
// memory is intact. It returns the status carrying the answer.
func Verify(t testing.TB, p *Proc) WorkloadStatus {
	t.Helper()
	before, err := p.Status()
	if err != nil {
		t.Fatalf("verify %s PID %d: %v", p.Host.Name, p.PID, err)
	}
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatalf("verify %s PID %d: %v", p.Host.Name, p.PID, err)
	}
	s := WaitStatus(t, p, func(s WorkloadStatus) bool { return s.VerifyCount > before.VerifyCount }, time.Minute)
	if s.Verify != "ok" || s.ColdSumNow != s.ColdSum {
		t.Fatalf("verify %s PID %d: cold memory changed: verify=%s checksum at start %s, now %s",
			p.Host.Name, p.PID, s.Verify, s.ColdSum, s.ColdSumNow)
	}
	return s
}

// ResetGap makes the workload forget its largest gap so far (SIGUSR2), so
// that MaxGap afterwards measures only what follows.
func ResetGap(t testing.TB, p *Proc) {
	t.Helper()
	if err := p.Signal(syscall.SIGUSR2); err != nil {
		t.Fatalf("reset gap %s PID %d: %v", p.Host.Name, p.PID, err)
	}
}

// MemhogBinary builds (once per test process) and returns the memhog
// workload, test/e2e/workload/memhog/memhog.c.
func MemhogBinary(t testing.TB) string {
	t.Helper()
	return buildC(t, "memhog", memhogSource)
}

// GoThreadsBinary builds (once per test process) and returns the
// multi-threaded Go workload, test/e2e/workload/gothreads.
func GoThreadsBinary(t testing.TB) string {
	t.Helper()
	return BuildTool(t, "./test/e2e/workload/gothreads")
}

// MemhogOptions are memhog's flags (see workload/memhog/memhog.c).
type MemhogOptions struct {
	MemMiB       int           // memory touched; 0 means 64
	HotMiB       int           // rewritten continuously
	HotPeriod    time.Duration // time to rewrite the hot part once; 0 means 1 s
	Compressible bool          // text-like content instead of pseudo-random bytes
	Children     int           // counting children
	Listen       int           // TCP port to listen on (0.0.0.0), 0 for none
	File         string        // file kept open, a line appended per second
	Pipe         bool          // a child streams sequence numbers through a pipe
}

// StartMemhog starts memhog in h with a status file in the bed's shared
// directory and waits until it wrote its first status (memory filled and
// checksummed).
func StartMemhog(t testing.TB, h *Host, o MemhogOptions) *Proc {
	t.Helper()
	bin := MemhogBinary(t)
	if o.MemMiB == 0 {
		o.MemMiB = 64
	}
	args := []string{"--mem", strconv.Itoa(o.MemMiB), "--hot", strconv.Itoa(o.HotMiB)}
	if o.HotPeriod > 0 {
		args = append(args, "--hot-period", strconv.FormatInt(o.HotPeriod.Milliseconds(), 10))
	}
	if o.Compressible {
		args = append(args, "--compressible")
	}
	if o.Children > 0 {
		args = append(args, "--children", strconv.Itoa(o.Children))
	}
	if o.Listen > 0 {
		args = append(args, "--listen", strconv.Itoa(o.Listen))
	}
	if o.File != "" {
		args = append(args, "--file", o.File)
	}
	if o.Pipe {
		args = append(args, "--pipe")
	}
	return startWorkload(t, h, "memhog", bin, args)
}

// GoThreadsOptions are gothreads' flags.
type GoThreadsOptions struct {
	Threads int // counting threads; 0 means 4
	MemMiB  int // memory with a checksum; 0 means 16
}

// StartGoThreads starts the multi-threaded Go workload in h with a status
// file in the bed's shared directory and waits for its first status.
func StartGoThreads(t testing.TB, h *Host, o GoThreadsOptions) *Proc {
	t.Helper()
	bin := GoThreadsBinary(t)
	if o.Threads == 0 {
		o.Threads = 4
	}
	if o.MemMiB == 0 {
		o.MemMiB = 16
	}
	args := []string{"--threads", strconv.Itoa(o.Threads), "--mem", strconv.Itoa(o.MemMiB)}
	return startWorkload(t, h, "gothreads", bin, args)
}

func startWorkload(t testing.TB, h *Host, name, bin string, args []string) *Proc {
	t.Helper()
	status := filepath.Join(h.Shared, fmt.Sprintf("%s.%d.status", name, h.bed.seq.Add(1)))
	args = append(args, "--status", status)
	p := h.Start(t, StartOptions{StatusFile: status}, bin, args...)
	WaitStatus(t, p, func(s WorkloadStatus) bool { return s.PID == p.PID && s.Counter > 0 }, time.Minute)
	return p
}
