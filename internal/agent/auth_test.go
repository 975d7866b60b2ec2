package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/test/e2e"
)

// helperSocketEnv, when set, makes the test binary a control client: it
// calls every Control method on the socket named by the variable and
// prints "METHOD CODE" lines (see controlHelper).
const helperSocketEnv = "MIGRATED_AGENT_TEST_CONTROL_SOCKET"

func TestMain(m *testing.M) {
	if sock := os.Getenv(helperSocketEnv); sock != "" {
		os.Exit(controlHelper(sock))
	}
	os.Exit(m.Run())
}

// controlHelper calls each Control method once and prints its status code.
func controlHelper(sock string) int {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Println("dial", err)
		return 1
	}
	defer conn.Close()
	c := migratev1.NewControlClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	report := func(name string, err error) {
		fmt.Printf("%s %s\n", name, status.Code(err))
		if status.Code(err) == codes.PermissionDenied || status.Code(err) == codes.Unavailable {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		}
	}
	_, err = c.Version(ctx, &migratev1.VersionRequest{})
	report("Version", err)
	_, err = c.ListMigrations(ctx, &migratev1.ListMigrationsRequest{})
	report("ListMigrations", err)
	_, err = c.GetMigration(ctx, &migratev1.GetMigrationRequest{MigrationId: "x"})
	report("GetMigration", err)
	_, err = c.CancelMigration(ctx, &migratev1.CancelMigrationRequest{MigrationId: "x"})
	report("CancelMigration", err)
	s, err := c.Move(ctx, &migratev1.MoveRequest{Pid: 1, Destination: "nowhere"})
	if err == nil {
		_, err = s.Recv()
	}
	report("Move", err)
	return 0
}

// versionOnly answers Version; every other method is Unimplemented, which
// tells a caller that passed the permission check.
type versionOnly struct {
	migratev1.UnimplementedControlServer
}

func (versionOnly) Version(context.Context, *migratev1.VersionRequest) (*migratev1.VersionResponse, error) {
	return &migratev1.VersionResponse{Version: "test"}, nil
}

// startControl serves versionOnly on a unix socket in a world-traversable
// directory with the peer-credential check of auth.
func startControl(t *testing.T, auth *ControlAuth, mode os.FileMode, gid int) (sock string, logs *logSink) {
	t.Helper()
	dir, err := os.MkdirTemp("", "mgauth")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if gid >= 0 {
		if err := os.Chown(sock, -1, gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(sock, mode); err != nil {
		t.Fatal(err)
	}
	logs = &logSink{}
	auth.Log = hclog.New(&hclog.LoggerOptions{Output: logs})
	s := grpc.NewServer(grpc.Creds(UnixCredentials()), grpc.ChainUnaryInterceptor(auth.Unary()), grpc.ChainStreamInterceptor(auth.Stream()))
	migratev1.RegisterControlServer(s, versionOnly{})
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(ln) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return sock, logs
}

func TestControlAuthorize(t *testing.T) {
	const group = 4242
	root := PeerCred{UID: 0, GID: 0}
	member := PeerCred{UID: 1000, GID: group}
	suppl := PeerCred{UID: 1000, GID: 1000, Groups: []int{7, group}}
	outsider := PeerCred{UID: 1000, GID: 1000, Groups: []int{7}}
	for _, tc := range []struct {
		name    string
		auth    ControlAuth
		method  string
		caller  credentials.AuthInfo
		allowed bool
	}{
		{"root moves", ControlAuth{Group: group}, migratev1.Control_Move_FullMethodName, root, true},
		{"root calls an unknown method", ControlAuth{Group: group}, "/migrate.v1.Control/Future", root, true},
		{"member lists", ControlAuth{Group: group}, migratev1.Control_ListMigrations_FullMethodName, member, true},
		{"member watches", ControlAuth{Group: group}, migratev1.Control_WatchMigration_FullMethodName, member, true},
		{"member checks", ControlAuth{Group: group}, migratev1.Control_Check_FullMethodName, member, true},
		{"supplementary member reads", ControlAuth{Group: group}, migratev1.Control_GetMigration_FullMethodName, suppl, true},
		{"member may not move", ControlAuth{Group: group}, migratev1.Control_Move_FullMethodName, member, false},
		{"member may not cancel", ControlAuth{Group: group}, migratev1.Control_CancelMigration_FullMethodName, suppl, false},
		{"member moves when allowed", ControlAuth{Group: group, GroupMayMove: true}, migratev1.Control_Move_FullMethodName, member, true},
		{"member cancels when allowed", ControlAuth{Group: group, GroupMayMove: true}, migratev1.Control_CancelMigration_FullMethodName, suppl, true},
		{"member never calls unknown methods", ControlAuth{Group: group, GroupMayMove: true}, "/migrate.v1.Control/Future", member, false},
		{"outsider may not read", ControlAuth{Group: group}, migratev1.Control_Version_FullMethodName, outsider, false},
		{"no group configured", ControlAuth{Group: -1}, migratev1.Control_Version_FullMethodName, member, false},
		{"no credentials", ControlAuth{Group: group}, migratev1.Control_Version_FullMethodName, nil, false},
		{"TLS without verified chain", ControlAuth{Group: group, RemoteAllow: []string{"orch"}}, migratev1.Control_Version_FullMethodName,
			credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{{DNSNames: []string{"orch"}}}}}, false},
		{"TLS on the allow-list", ControlAuth{Group: group, RemoteAllow: []string{"orch"}}, migratev1.Control_Move_FullMethodName,
			credentials.TLSInfo{State: tls.ConnectionState{
				PeerCertificates: []*x509.Certificate{{DNSNames: []string{"orch"}}},
				VerifiedChains:   [][]*x509.Certificate{{{DNSNames: []string{"orch"}}}},
			}}, true},
		{"TLS not on the allow-list", ControlAuth{Group: group, RemoteAllow: []string{"orch"}}, migratev1.Control_Version_FullMethodName,
			credentials.TLSInfo{State: tls.ConnectionState{
				PeerCertificates: []*x509.Certificate{{DNSNames: []string{"hostA"}}},
				VerifiedChains:   [][]*x509.Certificate{{{DNSNames: []string{"hostA"}}}},
			}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.auth.Authorize(tc.method, tc.caller)
			if tc.allowed && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.allowed && !errors.Is(err, ErrPermission) {
				t.Fatalf("Authorize = %v, want ErrPermission", err)
			}
		})
	}
}

func TestControlSocketCredentials(t *testing.T) {
	// This process calls: its own uid is always allowed, and the
	// credentials the server reads must be this process's.
	auth := &ControlAuth{Group: -1}
	sock, _ := startControl(t, auth, 0o600, -1)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := migratev1.NewControlClient(conn).Version(t.Context(), &migratev1.VersionRequest{}); err != nil {
		t.Fatalf("Version as the agent's own user: %v", err)
	}
	// Read the credentials directly, as the server does.
	ln, err := net.Listen("unix", filepath.Join(filepath.Dir(sock), "raw.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		cc, err := net.Dial("unix", ln.Addr().String())
		if err == nil {
			defer cc.Close()
			io.Copy(io.Discard, cc)
		}
	}()
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	got, err := readPeerCred(sc.(*net.UnixConn))
	if err != nil {
		t.Fatal(err)
	}
	if got.PID != os.Getpid() || got.UID != os.Geteuid() || got.GID != os.Getegid() {
		t.Fatalf("peer credentials %+v, want pid %d uid %d gid %d", got, os.Getpid(), os.Geteuid(), os.Getegid())
	}
	groups, _ := os.Getgroups()
	if len(got.Groups) != len(groups) {
		t.Fatalf("peer groups %v, want %v", got.Groups, groups)
	}
}

// runAs runs this test binary as a control client under uid/gid with the
// given supplementary groups and returns METHOD -> code.
func runAs(t *testing.T, sock string, uid, gid uint32, groups []uint32) map[string]string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary's own directory is private: copy it where any user
	// can run it.
	dir := filepath.Dir(sock)
	bin := filepath.Join(dir, "client")
	if _, err := os.Stat(bin); err != nil {
		data, err := os.ReadFile(self)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bin, data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = []string{helperSocketEnv + "=" + sock}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client as uid %d: %v\n%s%s", uid, err, out, stderr.String())
	}
	codes := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		m, c, _ := strings.Cut(l, " ")
		codes[m] = c
	}
	t.Logf("uid %d gid %d groups %v: %v", uid, gid, groups, codes)
	return codes
}

func TestControlSocketOtherUsers(t *testing.T) {
	e2e.RequireRoot(t)
	const group = 65534 // nogroup; no user in the test runs with it otherwise
	allowed := func(c string) bool { return c != "PermissionDenied" && c != "Unavailable" && c != "" }

	t.Run("group member reads but does not move", func(t *testing.T) {
		sock, logs := startControl(t, &ControlAuth{Group: group}, 0o660, group)
		got := runAs(t, sock, 65534, group, nil)
		for _, m := range []string{"Version", "ListMigrations", "GetMigration"} {
			if !allowed(got[m]) {
				t.Errorf("%s refused for a group member: %s", m, got[m])
			}
		}
		for _, m := range []string{"Move", "CancelMigration"} {
			if got[m] != "PermissionDenied" {
				t.Errorf("%s = %s for a group member, want PermissionDenied", m, got[m])
			}
		}
		if l := logs.String(); !strings.Contains(l, "control call refused") || !strings.Contains(l, "uid=65534") || !strings.Contains(l, "Move") {
			t.Errorf("no clear log line for the refusal:\n%s", l)
		}
	})
	t.Run("supplementary group member reads", func(t *testing.T) {
		sock, _ := startControl(t, &ControlAuth{Group: group}, 0o660, group)
		got := runAs(t, sock, 65533, 65533, []uint32{group})
		if !allowed(got["ListMigrations"]) || got["Move"] != "PermissionDenied" {
			t.Errorf("supplementary member: %v", got)
		}
	})
	t.Run("group member moves when allowed", func(t *testing.T) {
		sock, _ := startControl(t, &ControlAuth{Group: group, GroupMayMove: true}, 0o660, group)
		got := runAs(t, sock, 65534, group, nil)
		if !allowed(got["Move"]) || !allowed(got["CancelMigration"]) {
			t.Errorf("group_may_move: %v", got)
		}
	})
	t.Run("outsider cannot connect", func(t *testing.T) {
		sock, _ := startControl(t, &ControlAuth{Group: group}, 0o660, group)
		got := runAs(t, sock, 65533, 65533, nil)
		for m, c := range got {
			if c != "Unavailable" {
				t.Errorf("%s = %s for a user outside the group, want Unavailable (the socket's mode refuses it)", m, c)
			}
		}
	})
	t.Run("outsider refused by the credential check", func(t *testing.T) {
		// A socket anyone may open: the per-call check alone must refuse.
		sock, logs := startControl(t, &ControlAuth{Group: group}, 0o666, group)
		got := runAs(t, sock, 65533, 65533, nil)
		for m, c := range got {
			if c != "PermissionDenied" {
				t.Errorf("%s = %s for a user outside the group, want PermissionDenied", m, c)
			}
		}
		if l := logs.String(); !strings.Contains(l, "uid=65533") || !strings.Contains(l, "neither root nor a member") {
			t.Errorf("no clear log line for the refusal:\n%s", l)
		}
	})
}
