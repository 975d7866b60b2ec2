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
	"sync"
	"testing"
	"time"

	"github.com/migrated/migrated/internal/certs"
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
	// TLS is the agent's identity on the Peer API; the zero value when the
	// agent runs with --insecure.
	TLS  TLSFiles
	args []string
}

// TLSFiles are the PEM files of an agent's TLS identity.
type TLSFiles struct {
	Cert, Key, CA string
}

// shmWorkDir is h's agent work directory on /dev/shm, a tmpfs, as a real
// host's /run/migrated/work is: pages and images stay in memory. It is
// removed at the end of the test.
func shmWorkDir(t testing.TB, h *Host) string {
	base := filepath.Join("/dev/shm", filepath.Base(filepath.Dir(h.Dir)))
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	return filepath.Join(base, h.Name+"-work")
}

// StartAgent builds (once) and starts migrated in h with its state under
// h.Dir, waits until its control socket answers, and stops it at cleanup.
// extra is appended to the daemon's flags.
//
// The Peer API runs with mutual TLS: the bed's CA (BedPKI) issues h a
// certificate naming h.Name and h.IP, passed with --tls-cert, --tls-key and
// --tls-ca. With "--insecure" among extra the agent gets no TLS flags and
// serves plain TCP. A "--socket PATH" among extra replaces the default
// control socket (h.Dir is private to root; a test that calls as another
// user puts the socket elsewhere).
func StartAgent(t testing.TB, h *Host, extra ...string) *Agent {
	t.Helper()
	var tlsArgs []string
	var files TLSFiles
	if !contains(extra, "--insecure") {
		files = BedPKI(t, h).HostFiles(t, h)
		tlsArgs = []string{"--tls-cert", files.Cert, "--tls-key", files.Key, "--tls-ca", files.CA}
	}
	a := &Agent{
		Host:     h,
		Socket:   filepath.Join(h.Dir, "migrated.sock"),
		Addr:     net.JoinHostPort(h.IP, "7446"),
		StateDir: filepath.Join(h.Dir, "state"),
		WorkDir:  shmWorkDir(t, h),
		Bin:      BuildTool(t, "./cmd/migrated"),
		CtlBin:   BuildTool(t, "./cmd/migratectl"),
		TLS:      files,
	}
	for i, x := range extra {
		if x == "--socket" && i+1 < len(extra) {
			a.Socket = extra[i+1]
		}
	}
	a.args = append([]string{"--config", "/dev/null", "--socket", a.Socket, "--listen", a.Addr, "--state-dir", a.StateDir,
		"--work-dir", a.WorkDir, "--log-level", "debug"}, tlsArgs...)
	a.args = append(a.args, extra...)
	a.Start(t)
	return a
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// PKI is a certificate authority for a test bed with its files in Dir.
type PKI struct {
	Dir string
	CA  *certs.CA
	// CAFile is the authority's certificate, for --tls-ca.
	CAFile string

	mu     sync.Mutex
	issued map[string]TLSFiles
}

var bedPKIs = struct {
	sync.Mutex
	m map[string]*PKI
}{m: map[string]*PKI{}}

// BedPKI returns the certificate authority of h's bed, creating it in the
// bed's directory on first use (it goes with the bed at teardown).
func BedPKI(t testing.TB, h *Host) *PKI {
	t.Helper()
	dir := filepath.Join(h.bedDir(), "pki")
	bedPKIs.Lock()
	defer bedPKIs.Unlock()
	if p, ok := bedPKIs.m[dir]; ok {
		if _, err := os.Stat(p.CAFile); err == nil {
			return p
		}
	}
	p := NewPKI(t, dir)
	bedPKIs.m[dir] = p
	return p
}

// NewPKI creates an authority with its files in dir.
func NewPKI(t testing.TB, dir string) *PKI {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca, err := certs.NewCA("migrated e2e CA", now.Add(-time.Hour), now.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	p := &PKI{Dir: dir, CA: ca, CAFile: filepath.Join(dir, "ca.crt"), issued: map[string]TLSFiles{}}
	if err := os.WriteFile(p.CAFile, ca.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// HostFiles returns h's certificate files (issued once per host): SANs
// h.Name and h.IP, valid for a day.
func (p *PKI) HostFiles(t testing.TB, h *Host) TLSFiles {
	t.Helper()
	p.mu.Lock()
	f, ok := p.issued[h.Name]
	p.mu.Unlock()
	if ok {
		return f
	}
	now := time.Now()
	f = p.Issue(t, h.Name, certs.Host{Name: h.Name, IPs: []net.IP{net.ParseIP(h.IP)}}, now.Add(-time.Hour), now.Add(24*time.Hour))
	p.mu.Lock()
	p.issued[h.Name] = f
	p.mu.Unlock()
	return f
}

// Issue writes a certificate for host, valid from notBefore to notAfter, as
// file name base.crt and base.key in p.Dir.
func (p *PKI) Issue(t testing.TB, base string, host certs.Host, notBefore, notAfter time.Time) TLSFiles {
	t.Helper()
	cp, kp, err := p.CA.Issue(host, notBefore, notAfter)
	if err != nil {
		t.Fatal(err)
	}
	f := TLSFiles{Cert: filepath.Join(p.Dir, base+".crt"), Key: filepath.Join(p.Dir, base+".key"), CA: p.CAFile}
	if err := os.WriteFile(f.Cert, cp, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Key, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
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
