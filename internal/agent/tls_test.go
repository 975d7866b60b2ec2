package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/migrated/migrated/internal/certs"
)

// testPKI writes an authority and returns a function that issues host
// certificates under it into dir.
type testPKI struct {
	t   *testing.T
	dir string
	ca  *certs.CA
	caf string
}

func newTestPKI(t *testing.T, name string) *testPKI {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca, err := certs.NewCA(name, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{t: t, dir: dir, ca: ca, caf: filepath.Join(dir, "ca.crt")}
	if err := os.WriteFile(p.caf, ca.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *testPKI) issue(name string, ips []string, notBefore, notAfter time.Time) TLSFiles {
	p.t.Helper()
	h := certs.Host{Name: name}
	for _, ip := range ips {
		h.IPs = append(h.IPs, net.ParseIP(ip))
	}
	cp, kp, err := p.ca.Issue(h, notBefore, notAfter)
	if err != nil {
		p.t.Fatal(err)
	}
	f := TLSFiles{Cert: filepath.Join(p.dir, name+".crt"), Key: filepath.Join(p.dir, name+".key"), CA: p.caf}
	if err := os.WriteFile(f.Cert, cp, 0o644); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(f.Key, kp, 0o600); err != nil {
		p.t.Fatal(err)
	}
	return f
}

func (p *testPKI) valid(name string, ips ...string) TLSFiles {
	now := time.Now()
	return p.issue(name, ips, now.Add(-time.Minute), now.Add(time.Hour))
}

// logSink collects log lines.
type logSink struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startTLSServer serves the health service with the Peer API's credentials
// on 127.0.0.1.
func startTLSServer(t *testing.T, files TLSFiles, allow []string) (addr string, logs *logSink, refused func() int) {
	t.Helper()
	srvCfg, _, err := LoadTLS(files, allow)
	if err != nil {
		t.Fatal(err)
	}
	logs = &logSink{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	n := 0
	var mu sync.Mutex
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(ServerCredentials(srvCfg, log, func() { mu.Lock(); n++; mu.Unlock() })))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(ln) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return ln.Addr().String(), logs, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

func healthCheck(t *testing.T, addr string, creds credentials.TransportCredentials) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func clientCreds(t *testing.T, f TLSFiles, serverName string) credentials.TransportCredentials {
	t.Helper()
	_, c, err := LoadTLS(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.ServerName = serverName
	return credentials.NewTLS(c)
}

func TestPeerTLS(t *testing.T) {
	pki := newTestPKI(t, "ca")
	server := pki.valid("hostB", "127.0.0.1")
	other := newTestPKI(t, "otherca")
	now := time.Now()

	cases := []struct {
		name    string
		allow   []string
		creds   func(t *testing.T) credentials.TransportCredentials
		ok      bool
		logWant string // in the server's log when refused
	}{
		{name: "valid", creds: func(t *testing.T) credentials.TransportCredentials {
			return clientCreds(t, pki.valid("hostA", "10.0.0.1"), "127.0.0.1")
		}, ok: true},
		{name: "valid on allow-list by name", allow: []string{"hostA"}, creds: func(t *testing.T) credentials.TransportCredentials {
			return clientCreds(t, pki.valid("hostA", "10.0.0.1"), "127.0.0.1")
		}, ok: true},
		{name: "valid on allow-list by IP", allow: []string{"10.0.0.1"}, creds: func(t *testing.T) credentials.TransportCredentials {
			return clientCreds(t, pki.valid("hostA", "10.0.0.1"), "127.0.0.1")
		}, ok: true},
		{name: "SAN not on allow-list", allow: []string{"hostC", "10.0.0.3"}, creds: func(t *testing.T) credentials.TransportCredentials {
			return clientCreds(t, pki.valid("hostA", "10.0.0.1"), "127.0.0.1")
		}, logWant: "not on the allow-list"},
		{name: "no client certificate", creds: func(t *testing.T) credentials.TransportCredentials {
			_, c, err := LoadTLS(pki.valid("hostA"), nil)
			if err != nil {
				t.Fatal(err)
			}
			c.Certificates = nil
			c.ServerName = "127.0.0.1"
			return credentials.NewTLS(c)
		}, logWant: "certificate"},
		{name: "certificate from another CA", creds: func(t *testing.T) credentials.TransportCredentials {
			f := other.valid("hostA", "10.0.0.1")
			_, c, err := LoadTLS(f, nil)
			if err != nil {
				t.Fatal(err)
			}
			// Trust the right server CA so that only the client side is wrong.
			_, good, err := LoadTLS(pki.valid("x"), nil)
			if err != nil {
				t.Fatal(err)
			}
			c.RootCAs = good.RootCAs
			c.ServerName = "127.0.0.1"
			// Send the certificate even though the server asks for one of
			// its CA (a Go client would otherwise send none).
			pair := c.Certificates[0]
			c.Certificates = nil
			c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }
			return credentials.NewTLS(c)
		}, logWant: "unknown authority"},
		{name: "expired certificate", creds: func(t *testing.T) credentials.TransportCredentials {
			// LoadTLS refuses an expired certificate, so build the client
			// configuration around it by hand.
			f := pki.issue("old", []string{"10.0.0.1"}, now.Add(-48*time.Hour), now.Add(-24*time.Hour))
			_, good, err := LoadTLS(pki.valid("y"), nil)
			if err != nil {
				t.Fatal(err)
			}
			pair, err := loadPair(f)
			if err != nil {
				t.Fatal(err)
			}
			good.Certificates = pair
			good.ServerName = "127.0.0.1"
			return credentials.NewTLS(good)
		}, logWant: "expired"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr, logs, refused := startTLSServer(t, server, tc.allow)
			err := healthCheck(t, addr, tc.creds(t))
			if tc.ok {
				if err != nil {
					t.Fatalf("health check with a valid certificate: %v\nserver log:\n%s", err, logs)
				}
				return
			}
			if err == nil {
				t.Fatal("the server accepted the call")
			}
			if c := status.Code(err); c != codes.Unavailable {
				t.Fatalf("code %s, want Unavailable (the connection is refused): %v", c, err)
			}
			// The refusal is logged when the handshake ends, which may be
			// just after the client saw it.
			deadline := time.Now().Add(10 * time.Second)
			for (!strings.Contains(logs.String(), "peer refused: TLS handshake failed") || refused() == 0) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			l := logs.String()
			if !strings.Contains(l, "peer refused: TLS handshake failed") || !strings.Contains(l, tc.logWant) || !strings.Contains(l, "remote=127.0.0.1:") {
				t.Fatalf("server log lacks a clear refusal with %q:\n%s", tc.logWant, l)
			}
			if refused() == 0 {
				t.Fatal("refusal not counted")
			}
		})
	}
}

func TestClientChecksServerSAN(t *testing.T) {
	pki := newTestPKI(t, "ca")
	// The server's certificate names 10.9.9.9, not the address dialled.
	addr, _, _ := startTLSServer(t, pki.valid("hostB", "10.9.9.9"), nil)
	err := healthCheck(t, addr, clientCreds(t, pki.valid("hostA"), "127.0.0.1"))
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("client accepted a server certificate for another address: %v", err)
	}
}

func TestLoadTLSRefuses(t *testing.T) {
	pki := newTestPKI(t, "ca")
	other := newTestPKI(t, "other")
	now := time.Now()
	good := pki.valid("hostA", "10.0.0.1")
	foreign := other.valid("hostF")
	foreign.CA = pki.caf
	expired := pki.issue("old", nil, now.Add(-2*time.Hour), now.Add(-time.Hour))
	swapped := TLSFiles{Cert: good.Cert, Key: expired.Key, CA: good.CA}
	for _, tc := range []struct {
		name  string
		f     TLSFiles
		allow []string
		want  string
	}{
		{"missing cert", TLSFiles{Cert: "/nonexistent.crt", Key: good.Key, CA: good.CA}, nil, "/nonexistent.crt"},
		{"missing CA", TLSFiles{Cert: good.Cert, Key: good.Key, CA: "/nonexistent-ca.crt"}, nil, "/nonexistent-ca.crt"},
		{"key of another certificate", swapped, nil, "private key does not match"},
		{"signed by another CA", foreign, nil, "does not verify against CA"},
		{"expired", expired, nil, "expired"},
		{"empty allow entry", good, []string{""}, "empty entry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := LoadTLS(tc.f, tc.allow)
			if err == nil || !errors.Is(err, ErrTLSConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadTLS = %v, want ErrTLSConfig mentioning %q", err, tc.want)
			}
		})
	}
	s, c, err := LoadTLS(good, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.MinVersion != 0x0304 || c.MinVersion != 0x0304 {
		t.Fatalf("MinVersion server %x client %x, want TLS 1.3", s.MinVersion, c.MinVersion)
	}
}

func loadPair(f TLSFiles) ([]tls.Certificate, error) {
	p, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, err
	}
	return []tls.Certificate{p}, nil
}
