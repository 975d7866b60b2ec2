package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/certs"
)

// dialFrom returns a gRPC context dialer whose connections are made from
// inside h's network namespace: the socket is created on a thread that
// entered it (the thread is discarded afterwards), so the test process can
// talk to agents as a raw client from that host.
func dialFrom(h *Host) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			// Never unlocked: the thread ends with this goroutine instead of
			// going back to the scheduler in another namespace.
			runtime.LockOSThread()
			ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", h.ReaperPID))
			if err != nil {
				ch <- result{nil, err}
				return
			}
			defer ns.Close()
			if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
				ch <- result{nil, fmt.Errorf("setns into %s: %w", h.Name, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// rawPeer is a Peer API client in host from, dialling to with tlsCfg (nil:
// plain TCP).
func rawPeer(t *testing.T, from *Host, to *Agent, tlsCfg *tls.Config) migratev1.PeerClient {
	t.Helper()
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		creds = credentials.NewTLS(tlsCfg)
	}
	conn, err := grpc.NewClient("passthrough:///"+to.Addr, grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(dialFrom(from)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return migratev1.NewPeerClient(conn)
}

// clientTLS is a TLS client configuration presenting files' certificate
// (even one a Go client would not choose to send) and trusting ca for the
// server, which must name the address dialled.
func clientTLS(t *testing.T, files TLSFiles, ca string, server *Agent) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(ca)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	host, _, _ := net.SplitHostPort(server.Addr)
	c := &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS13}
	if files.Cert != "" {
		pair, err := tls.LoadX509KeyPair(files.Cert, files.Key)
		if err != nil {
			t.Fatal(err)
		}
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }
	}
	return c
}

// waitLogAll waits until the agent's log contains every one of want.
func waitLogAll(t *testing.T, a *Agent, want ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		l := a.Log()
		missing := ""
		for _, w := range want {
			if !strings.Contains(l, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: log lacks %q:\n%s", a.Host.Name, missing, l)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// journalRecords lists the migration records an agent keeps.
func journalRecords(t *testing.T, a *Agent) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(a.StateDir, "journal"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".json") {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestPeerAPIRefusesUntrustedPeers: a destination that allows only "hostZ"
// refuses a real migration from hostA (whose certificate is valid but not
// allowed) and raw clients without a certificate, with one of another CA,
// with an expired one and with one whose SAN is not on the allow-list; the
// process stays on the source, nothing is restored or recorded on the
// destination, and each refusal is logged with its reason.
func TestPeerAPIRefusesUntrustedPeers(t *testing.T) {
	b := newMigrationBed(t, "--peer-allow", "hostZ")
	pki := BedPKI(t, b.A)

	p := startMemhog(t, b.A, "--mem", "64")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	r := b.SrcAgent.Move(t, p.PID, b.DstAgent)
	logEvents(t, r)
	if r.Err == nil {
		t.Fatalf("a move to a destination that does not allow the source succeeded: %+v", r.Last)
	}
	assertRunsOnSource(t, b, p, before)
	waitLogAll(t, b.DstAgent, "peer refused: TLS handshake failed", "not on the allow-list", "remote="+b.A.IP)

	now := time.Now()
	other := NewPKI(t, filepath.Join(t.TempDir(), "otherca"))
	ipA := []net.IP{net.ParseIP(b.A.IP)}
	cases := []struct {
		name string
		cfg  *tls.Config
		log  string
	}{
		{"no client certificate", clientTLS(t, TLSFiles{}, pki.CAFile, b.DstAgent), "client didn't provide a certificate"},
		{"certificate of another CA", clientTLS(t, other.Issue(t, "hostA-other", certs.Host{Name: "hostZ", IPs: ipA}, now.Add(-time.Hour), now.Add(time.Hour)), pki.CAFile, b.DstAgent), "unknown authority"},
		{"expired certificate", clientTLS(t, pki.Issue(t, "hostZ-expired", certs.Host{Name: "hostZ", IPs: ipA}, now.Add(-48*time.Hour), now.Add(-24*time.Hour)), pki.CAFile, b.DstAgent), "expired"},
		{"SAN not on the allow-list", clientTLS(t, pki.Issue(t, "hostY", certs.Host{Name: "hostY", IPs: ipA}, now.Add(-time.Hour), now.Add(time.Hour)), pki.CAFile, b.DstAgent), "certificate \\\"hostY\\\" names hostY"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := rawPeer(t, b.A, b.DstAgent, tc.cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: "intruder", Pids: []int32{2999}})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("prepare: %v, want Unavailable (connection refused at the handshake)", err)
			}
			waitLogAll(t, b.DstAgent, tc.log)
		})
	}
	t.Run("plain TCP", func(t *testing.T) {
		c := rawPeer(t, b.A, b.DstAgent, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: "intruder", Pids: []int32{2999}}); status.Code(err) != codes.Unavailable {
			t.Fatalf("prepare over plain TCP: %v", err)
		}
		waitLogAll(t, b.DstAgent, "first record does not look like a TLS handshake")
	})
	if recs := journalRecords(t, b.DstAgent); len(recs) != 0 {
		t.Fatalf("the destination recorded migrations from refused peers: %v", recs)
	}
	assertNoLeftovers(t, b)

	// The allowed identity gets through: the refusals above are about the
	// certificates, not a broken connection.
	allowed := clientTLS(t, pki.Issue(t, "hostZ", certs.Host{Name: "hostZ", IPs: ipA}, now.Add(-time.Hour), now.Add(time.Hour)), pki.CAFile, b.DstAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := rawPeer(t, b.A, b.DstAgent, allowed).Status(ctx, &migratev1.PeerStatusRequest{MigrationId: "nothing"})
	if err != nil || st.State != "unknown" {
		t.Fatalf("status as the allowed peer: %v %v", st, err)
	}
}

// TestPeerAPIRefusesBadMessages: an authenticated peer that sends an
// oversized message, image names that climb out of the work directory, and
// calls out of order is refused each time, and the agent goes on serving:
// a real migration succeeds afterwards while the peer's prepared migration
// is still open.
func TestPeerAPIRefusesBadMessages(t *testing.T) {
	b := newMigrationBed(t)
	pki := BedPKI(t, b.A)
	c := rawPeer(t, b.A, b.DstAgent, clientTLS(t, pki.HostFiles(t, b.A), pki.CAFile, b.DstAgent))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	_, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: "huge", Pids: []int32{2999}, Cpuinfo: make([]byte, 20<<20)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("20 MiB prepare: %v, want ResourceExhausted", err)
	}

	const id = "evil"
	if _, err := c.Restore(ctx, &migratev1.RestoreRequest{MigrationId: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("restore before prepare: %v, want NotFound", err)
	}
	pr, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: id, Pids: []int32{2999}})
	if err != nil || !pr.Ok {
		t.Fatalf("prepare: %v %v", pr, err)
	}
	if pr, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: id, Pids: []int32{2999}}); err != nil || !pr.Ok {
		t.Fatalf("repeated prepare (idempotent): %v %v", pr, err)
	}
	for _, call := range []struct {
		name string
		err  error
	}{
		{"restore before pages", func() error { _, err := c.Restore(ctx, &migratev1.RestoreRequest{MigrationId: id}); return err }()},
		{"commit before restore", func() error { _, err := c.Commit(ctx, &migratev1.CommitRequest{MigrationId: id}); return err }()},
		{"status of a bad id", func() error {
			_, err := c.Status(ctx, &migratev1.PeerStatusRequest{MigrationId: "../../etc"})
			return err
		}()},
	} {
		if code := status.Code(call.err); code != codes.FailedPrecondition && code != codes.InvalidArgument {
			t.Fatalf("%s: %v, want a refusal", call.name, call.err)
		}
	}
	workDir := filepath.Join(b.DstAgent.WorkDir, id)
	escapes := map[string]string{
		"../escaped.img":            filepath.Join(workDir, "escaped.img"),
		"../../escaped.img":         filepath.Join(b.DstAgent.WorkDir, "escaped.img"),
		"../../../../../../tmp/pwn": "/tmp/pwn",
		"/tmp/pwn2":                 "/tmp/pwn2",
	}
	for name, target := range escapes {
		s, err := c.SendImages(ctx)
		if err != nil {
			t.Fatal(err)
		}
		data := []byte("#!/bin/sh\necho pwned\n")
		sum := sha256.Sum256(data)
		_ = s.Send(&migratev1.ImageChunk{MigrationId: id, Name: name, Data: data, Last: true, Sha256: sum[:]})
		_, err = s.CloseAndRecv()
		if code := status.Code(err); code != codes.FailedPrecondition && code != codes.InvalidArgument {
			t.Fatalf("image name %q: %v, want a refusal", name, err)
		}
		if _, err := os.Stat(target); err == nil {
			os.Remove(target)
			t.Fatalf("image name %q wrote %s", name, target)
		}
	}
	waitLogAll(t, b.DstAgent, "image refused", "image name")

	// Another migration goes through while "evil" is still prepared.
	p := startMemhog(t, b.A, "--mem", "64")
	before, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	r := b.SrcAgent.Move(t, p.PID, b.DstAgent)
	logEvents(t, r)
	if r.Err != nil {
		t.Fatalf("move after refused input: %v\n%s", r.Err, r.Stderr)
	}
	if st, err := c.Status(ctx, &migratev1.PeerStatusRequest{MigrationId: id}); err != nil || st.State != "prepared" {
		t.Fatalf("the bad peer's migration: %v %v", st, err)
	}
	if _, err := c.Abort(ctx, &migratev1.AbortRequest{MigrationId: id, Reason: "test over"}); err != nil {
		t.Fatal(err)
	}
	assertMoved(t, b, p, r, before)
}

// TestControlSocketPermissions: with --socket-group, a member of the group
// may list and read the version but not move; a user outside the group
// cannot use the socket at all; root may do everything. The callers run in
// the agent's host as other users (setpriv).
func TestControlSocketPermissions(t *testing.T) {
	RequireCRIU(t)
	hs := NewHosts(t, 1)
	h := hs[0]
	// The host's directory is private to root: the socket goes to a
	// directory other users can traverse.
	dir, err := os.MkdirTemp("", "mgsec")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const group = "65534" // nogroup
	a := StartAgent(t, h, "--socket", filepath.Join(dir, "ctl.sock"), "--socket-group", group)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log:\n%s", a.Log())
		}
	})
	st, err := os.Stat(a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Gid != 65534 {
		t.Fatalf("socket mode %v gid %d, want 0660 and gid 65534", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid)
	}
	as := func(uid, gid string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		argv := append([]string{"--reuid=" + uid, "--regid=" + gid, "--clear-groups", a.CtlBin, "--socket", a.Socket}, args...)
		out, err := h.Command(ctx, "setpriv", argv...).CombinedOutput()
		return string(out), err
	}
	target := h.Start(t, StartOptions{}, "sleep", "100000")

	// A member of the group.
	if out, err := as("65534", group, "list"); err != nil {
		t.Fatalf("group member: list: %v\n%s", err, out)
	}
	if out, err := as("65534", group, "version"); err != nil || !strings.Contains(out, "peer API   mtls") {
		t.Fatalf("group member: version: %v\n%s", err, out)
	}
	out, err := as("65534", group, "move", fmt.Sprint(target.PID), "--to", "10.201.0.250")
	if err == nil || !strings.Contains(out, "permission denied") || !strings.Contains(out, "Move needs root") {
		t.Fatalf("group member: move: %v\n%s", err, out)
	}
	waitLogAll(t, a, "control call refused", "method=/migrate.v1.Control/Move", "uid=65534")
	if info, err := target.Info(); err != nil || info.State == 'T' {
		t.Fatalf("the target of the refused move: %+v %v", info, err)
	}
	// Outside the group: the socket's mode already refuses.
	out, err = as("65533", "65533", "list")
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("outsider: list: %v\n%s", err, out)
	}
	// Root.
	if out, _, err := a.Ctl(context.Background(), "list"); err != nil {
		t.Fatalf("root: list: %v\n%s", err, out)
	}
}
