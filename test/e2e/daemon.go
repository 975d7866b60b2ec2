package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Agent is a migrated daemon running in a test host, started as a separate
// process from the built binary.
type Agent struct {
	Host     *Host
	Proc     *Proc
	Socket   string // control socket (reachable from the test process)
	Addr     string // peer API address, host IP:7446
	StateDir string
	WorkDir  string
	Bin      string // bin/migrated
	CtlBin   string // bin/migratectl
	args     []string
}

// StartAgent builds (once) and starts migrated in h with its state under
// h.Dir, waits until its control socket answers, and stops it at cleanup.
// extra is appended to the daemon's flags.
func StartAgent(t testing.TB, h *Host, extra ...string) *Agent {
	t.Helper()
	a := &Agent{
		Host:     h,
		Socket:   filepath.Join(h.Dir, "migrated.sock"),
		Addr:     net.JoinHostPort(h.IP, "7446"),
		StateDir: filepath.Join(h.Dir, "state"),
		WorkDir:  filepath.Join(h.Dir, "work"),
		Bin:      BuildTool(t, "./cmd/migrated"),
		CtlBin:   BuildTool(t, "./cmd/migratectl"),
	}
	a.args = append([]string{"--socket", a.Socket, "--listen", a.Addr, "--state-dir", a.StateDir,
		"--work-dir", a.WorkDir, "--insecure", "--log-level", "debug"}, extra...)
	a.Start(t)
	return a
}

// Start (re)starts the daemon with the flags it was created with.
func (a *Agent) Start(t testing.TB) {
	t.Helper()
	_ = os.Remove(a.Socket)
	a.Proc = a.Host.Start(t, StartOptions{}, a.Bin, a.args...)
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := a.Host.Command(context.Background(), a.CtlBin, "--socket", a.Socket, "version").CombinedOutput()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: migrated did not come up: %v: %s\nlog:\n%s", a.Host.Name, err, out, a.Log())
		}
		if _, perr := a.Proc.Info(); perr != nil {
			t.Fatalf("%s: migrated exited at start:\n%s", a.Host.Name, a.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop sends SIGTERM and waits for the daemon to exit.
func (a *Agent) Stop(t testing.TB) {
	t.Helper()
	_ = a.Proc.Signal(15)
	a.waitGone(t, 20*time.Second)
}

// Kill9 kills the daemon with SIGKILL.
func (a *Agent) Kill9(t testing.TB) {
	t.Helper()
	_ = a.Proc.Kill()
	a.waitGone(t, 10*time.Second)
}

func (a *Agent) waitGone(t testing.TB, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		info, err := a.Proc.Info()
		if err != nil || info.State == 'Z' {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: migrated did not exit", a.Host.Name)
}

// Log returns what the daemon wrote to stderr.
func (a *Agent) Log() string {
	if a.Proc == nil {
		return ""
	}
	b, _ := os.ReadFile(a.Proc.Stderr)
	return string(b)
}

// Ctl runs migratectl in the agent's host against its socket and returns
// stdout, stderr and the exit error.
func (a *Agent) Ctl(ctx context.Context, args ...string) (string, string, error) {
	cmd := a.Host.Command(ctx, a.CtlBin, append([]string{"--socket", a.Socket}, args...)...)
	var so, se strings.Builder
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	return so.String(), se.String(), err
}

// MoveEvent is one line of `migratectl move --json`.
type MoveEvent struct {
	MigrationID     string  `json:"migration_id"`
	Phase           string  `json:"phase"`
	Message         string  `json:"message"`
	ElapsedMs       int64   `json:"elapsed_ms"`
	Round           int     `json:"round"`
	PagesScanned    uint64  `json:"pages_scanned"`
	PagesSent       uint64  `json:"pages_sent"`
	PagesReferenced uint64  `json:"pages_referenced"`
	RawBytes        uint64  `json:"raw_bytes"`
	WireBytes       uint64  `json:"wire_bytes"`
	DowntimeMs      *int64  `json:"downtime_ms"`
	TotalMs         *int64  `json:"total_ms"`
	Rounds          *uint32 `json:"rounds"`
	DestPID         *int32  `json:"dest_pid"`
	Error           string  `json:"error"`
	FailedPhase     string  `json:"failed_phase"`
	ProcessLocation string  `json:"process_location"`
	Advice          string  `json:"advice"`
}

// MoveResult is a finished `migratectl move --json`.
type MoveResult struct {
	Events []MoveEvent
	Last   MoveEvent
	Err    error // migratectl's exit error
	Stderr string
}

// Move runs `migratectl move PID --to dst --json ARGS...` in the agent's
// host and parses its events.
func (a *Agent) Move(t testing.TB, pid int, dst *Agent, args ...string) MoveResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	argv := append([]string{"move", fmt.Sprint(pid), "--to", dst.Addr, "--json"}, args...)
	out, serr, err := a.Ctl(ctx, argv...)
	r := MoveResult{Err: err, Stderr: serr}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e MoveEvent
		if jerr := json.Unmarshal(sc.Bytes(), &e); jerr != nil {
			t.Fatalf("migratectl printed a line that is not JSON: %q", sc.Text())
		}
		r.Events = append(r.Events, e)
	}
	if len(r.Events) > 0 {
		r.Last = r.Events[len(r.Events)-1]
	}
	return r
}

// bedDir is a directory every host of the bed sees at the same path.
func (h *Host) bedDir() string { return filepath.Dir(h.Dir) }

// occupyPID starts a process that holds pid in h (by setting the host's
// ns_last_pid just before a fork) and returns it.
func (h *Host) occupyPID(t testing.TB, pid int) *Proc {
	t.Helper()
	for try := 0; try < 10; try++ {
		h.Start(t, StartOptions{}, "sh", "-c", fmt.Sprintf("echo %d > /proc/sys/kernel/ns_last_pid; sleep 100000 & wait", pid-1))
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			if info, err := h.Process(pid); err == nil && info.Comm == "sleep" {
				return &Proc{Host: h, PID: pid, Args: info.Cmdline}
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Fatalf("%s: could not occupy pid %d", h.Name, pid)
	return nil
}
