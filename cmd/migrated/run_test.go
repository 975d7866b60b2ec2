package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/agent"
	"github.com/migrated/migrated/internal/certs"
	"github.com/migrated/migrated/pkg/client"
)

// syncBuffer is a bytes.Buffer safe for the daemon's logger and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// shortDir returns a directory short enough for unix socket paths.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "mgd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// daemon runs run() until the test ends.
type daemon struct {
	dir    string
	socket string
	log    *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

func startDaemon(t *testing.T, dir string, args ...string) *daemon {
	t.Helper()
	d := &daemon{dir: dir, socket: filepath.Join(dir, "ctl.sock"), log: &syncBuffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	argv := append([]string{"--config", "/dev/null", "--listen", "127.0.0.1:0", "--socket", d.socket,
		"--state-dir", filepath.Join(dir, "state"), "--log-level", "debug"}, args...)
	go func() { d.done <- run(ctx, argv, io.Discard, d.log) }()
	t.Cleanup(func() { d.stop(t) })
	return d
}

func (d *daemon) stop(t *testing.T) error {
	t.Helper()
	if d.cancel == nil {
		return nil
	}
	d.cancel()
	d.cancel = nil
	select {
	case err := <-d.done:
		return err
	case <-time.After(time.Minute):
		t.Fatalf("migrated did not stop:\n%s", d.log)
		return nil
	}
}

var listenRE = regexp.MustCompile(`listen=(\S+)`)
var metricsRE = regexp.MustCompile(`metrics_listen=(\S+)`)
var controlRE = regexp.MustCompile(`control_listen=(\S+)`)

// waitStarted waits for the start line and returns the peer and metrics
// addresses.
func (d *daemon) waitStarted(t *testing.T) (peer, metrics string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		l := d.log.String()
		if i := strings.Index(l, "migrated started"); i >= 0 {
			line := l[i:]
			line = line[:strings.IndexByte(line, '\n')]
			if m := listenRE.FindStringSubmatch(line); m != nil {
				peer = m[1]
			}
			if m := metricsRE.FindStringSubmatch(line); m != nil {
				metrics = m[1]
			}
			return peer, metrics
		}
		select {
		case err := <-d.done:
			t.Fatalf("migrated exited: %v\n%s", err, l)
		default:
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("migrated did not start:\n%s", d.log)
	return "", ""
}

func TestNotifyReadyAndStopping(t *testing.T) {
	dir := shortDir(t)
	sockPath := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sockPath)
	d := startDaemon(t, dir, "--insecure")
	recv := func() string {
		t.Helper()
		buf := make([]byte, 256)
		// A guard against a hang, not a timing condition.
		conn.SetReadDeadline(time.Now().Add(time.Minute))
		n, _, err := conn.ReadFrom(buf)
		if err != nil {
			t.Fatalf("no notification: %v\nlog:\n%s", err, d.log)
		}
		return string(buf[:n])
	}
	if got := recv(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	// Ready means serving: the control socket answers now.
	c, err := client.Dial(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.Raw().Version(context.Background(), &migratev1.VersionRequest{})
	if err != nil {
		t.Fatalf("control socket after READY=1: %v", err)
	}
	if v.PeerTransport != "insecure" || len(v.Warnings) == 0 || !strings.Contains(v.Warnings[0], "without TLS") {
		t.Fatalf("version of an insecure agent: transport %q warnings %q", v.PeerTransport, v.Warnings)
	}
	if !strings.Contains(d.log.String(), "WITHOUT TLS") {
		t.Fatalf("no loud warning at start:\n%s", d.log)
	}
	st, err := os.Stat(d.socket)
	if err != nil || st.Mode().Perm() != 0o660 {
		t.Fatalf("control socket mode %v (%v), want 0660", st.Mode().Perm(), err)
	}
	d.cancel()
	if got := recv(); got != "STOPPING=1" {
		t.Fatalf("notification at shutdown %q, want STOPPING=1", got)
	}
	if err := <-d.done; err != nil {
		t.Fatalf("run returned %v", err)
	}
	d.cancel = nil
	if _, err := os.Stat(d.socket); !os.IsNotExist(err) {
		t.Fatalf("control socket left behind: %v", err)
	}
}

func TestRefusesToStartWithoutTLS(t *testing.T) {
	dir := shortDir(t)
	err := run(context.Background(), []string{"--config", "/dev/null", "--listen", "127.0.0.1:0",
		"--socket", filepath.Join(dir, "s"), "--state-dir", filepath.Join(dir, "state")}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "tls.cert (--tls-cert)") || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("run without TLS: %v", err)
	}
	if _, serr := os.Stat(filepath.Join(dir, "s")); !os.IsNotExist(serr) {
		t.Fatal("the control socket was created by a daemon that refused to start")
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	dir := shortDir(t)
	cfg := filepath.Join(dir, "config")
	if err := os.WriteFile(cfg, []byte("insecure = true\n[limits]\nmax_per_peer = -1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := run(context.Background(), []string{"--config", cfg}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "limits.max_per_peer (--max-per-peer)") {
		t.Fatalf("bad config: %v", err)
	}
	err = run(context.Background(), []string{"--config", filepath.Join(dir, "missing")}, io.Discard, io.Discard)
	if err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("missing explicit config: %v", err)
	}
	err = run(context.Background(), []string{"--config", "/dev/null", "--insecure", "--socket-group", "no-such-group-here"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "socket_group (--socket-group)") {
		t.Fatalf("unknown group: %v", err)
	}
}

// buildMigratectl builds cmd/migratectl into the test's temporary
// directory and returns the binary's path.
func buildMigratectl(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "migratectl")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/migratectl")
	cmd.Dir = filepath.Join("..", "..")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/migratectl: %v\n%s", err, out)
	}
	return bin
}

// runCtl runs the migratectl binary with args and env on top of an
// environment without the MIGRATED_ variables.
func runCtl(t *testing.T, bin string, env []string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MIGRATED_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// exitCode is a command's exit status: 0 after success, -1 when it did not
// run to an exit.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok || u.Unwrap() == nil {
			return err
		}
		err = u.Unwrap()
	}
}

// TestMutualTLSDaemon starts the daemon from a configuration file with
// mutual TLS, a peer allow-list and metrics, and checks the peer port's
// health service with an allowed and a refused certificate.
func TestMutualTLSDaemon(t *testing.T) {
	dir := shortDir(t)
	pki := filepath.Join(dir, "pki")
	hosts, err := certs.ParseHosts("self=127.0.0.1", "friend=127.0.0.1", "stranger=127.0.0.1", "orch")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certs.Init(pki, hosts, 0); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "config")
	content := fmt.Sprintf("metrics_listen = \"127.0.0.1:0\"\n[control]\nlisten = \"127.0.0.1:0\"\nallow = [\"orch\"]\n[tls]\ncert = %q\nkey = %q\nca = %q\npeer_allow = [\"friend\"]\n",
		filepath.Join(pki, "self.crt"), filepath.Join(pki, "self.key"), filepath.Join(pki, "ca.crt"))
	if err := os.WriteFile(cfg, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &daemon{dir: dir, socket: filepath.Join(dir, "ctl.sock"), log: &syncBuffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	go func() {
		d.done <- run(ctx, []string{"--config", cfg, "--listen", "127.0.0.1:0", "--socket", d.socket,
			"--state-dir", filepath.Join(dir, "state")}, io.Discard, d.log)
	}()
	t.Cleanup(func() { d.stop(t) })
	peerAddr, metricsAddr := d.waitStarted(t)

	health := func(name string) error {
		_, c, err := agent.LoadTLS(agent.TLSFiles{Cert: filepath.Join(pki, name+".crt"), Key: filepath.Join(pki, name+".key"), CA: filepath.Join(pki, "ca.crt")}, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.ServerName = "127.0.0.1"
		conn, err := grpc.NewClient(peerAddr, grpc.WithTransportCredentials(credentials.NewTLS(c)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer ccancel()
		r, err := healthpb.NewHealthClient(conn).Check(cctx, &healthpb.HealthCheckRequest{})
		if err == nil && r.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health status %s", r.Status)
		}
		return err
	}
	if err := health("friend"); err != nil {
		t.Fatalf("allowed peer: %v\n%s", err, d.log)
	}
	if err := health("stranger"); err == nil {
		t.Fatal("a peer not on the allow-list passed the handshake")
	}
	// A plain TCP client is refused too.
	raw, err := tls.Dial("tcp", peerAddr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12})
	if err == nil {
		raw.Close()
		t.Fatal("a TLS 1.2 client without a certificate was accepted")
	}

	c, err := client.Dial(d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.Raw().Version(context.Background(), &migratev1.VersionRequest{})
	if err != nil || v.PeerTransport != "mtls" {
		t.Fatalf("version: %v %v", v, err)
	}

	// Remote control: only identities on control.allow.
	m := controlRE.FindStringSubmatch(d.log.String())
	if m == nil {
		t.Fatalf("no control_listen in the start line:\n%s", d.log)
	}
	remoteAddr := m[1]
	tlsFiles := func(name string) client.TLSFiles {
		return client.TLSFiles{Cert: filepath.Join(pki, name+".crt"), Key: filepath.Join(pki, name+".key"), CA: filepath.Join(pki, "ca.crt")}
	}
	remote := func(name string) (*migratev1.ListMigrationsResponse, error) {
		cfg, err := client.LoadTLS(tlsFiles(name))
		if err != nil {
			t.Fatal(err)
		}
		rc, err := client.DialTLS(remoteAddr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer ccancel()
		return rc.List(cctx)
	}
	if _, err := remote("orch"); err != nil {
		t.Fatalf("remote control as an allowed client: %v", err)
	}
	if _, err := remote("friend"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("remote control as a client not on control.allow: %v", err)
	}

	// The same through migratectl, with flags and with its environment.
	ctl := buildMigratectl(t)
	orch := tlsFiles("orch")
	stdout, stderr, err := runCtl(t, ctl, nil, "--addr", remoteAddr, "--tls-cert", orch.Cert, "--tls-key", orch.Key, "--tls-ca", orch.CA, "list")
	if err != nil || !strings.HasPrefix(stdout, "ID ") || !strings.Contains(stdout, "STATE") {
		t.Fatalf("migratectl --addr list as an allowed client: %v\nstdout:\n%s\nstderr:\n%s\nagent:\n%s", err, stdout, stderr, d.log)
	}
	friend := tlsFiles("friend")
	env := []string{"MIGRATED_ADDR=" + remoteAddr, "MIGRATED_TLS_CERT=" + friend.Cert, "MIGRATED_TLS_KEY=" + friend.Key, "MIGRATED_TLS_CA=" + friend.CA}
	stdout, stderr, err = runCtl(t, ctl, env, "list")
	if exitCode(err) == 0 || !strings.Contains(stderr, "permission denied") || !strings.Contains(stderr, "not on the control allow-list") {
		t.Fatalf("migratectl list as a client not on control.allow: exit %d, want a permission error and a non-zero exit\nstdout:\n%s\nstderr:\n%s", exitCode(err), stdout, stderr)
	}
	_, stderr, err = runCtl(t, ctl, nil, "--addr", remoteAddr, "--tls-cert", orch.Cert, "list")
	if exitCode(err) == 0 || !strings.Contains(stderr, "remote control needs --tls-cert, --tls-key and --tls-ca") {
		t.Fatalf("migratectl --addr without a key and CA: exit %d\nstderr:\n%s", exitCode(err), stderr)
	}

	// Refusals are counted when the server's side of the handshake ends,
	// which may be just after the client saw it.
	var body []byte
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(body), "migrated_peer_handshakes_refused_total 2") {
			break
		}
	}
	for _, want := range []string{`migrated_peer_handshakes_refused_total 2`, `migrated_migrations_total{result="moved"} 0`, "migrated_migrations_in_flight 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	if err := d.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	if l := d.log.String(); !strings.Contains(l, "peer refused: TLS handshake failed") || !strings.Contains(l, "not on the allow-list") {
		t.Fatalf("no clear refusal line:\n%s", l)
	}
}
