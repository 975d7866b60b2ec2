package client_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/agent"
	"github.com/migrated/migrated/internal/certs"
	"github.com/migrated/migrated/pkg/client"
)

// writePKI creates a CA in dir and certificates for hosts; it returns
// the files of each host.
func writePKI(t *testing.T, dir string, hosts ...string) map[string]client.TLSFiles {
	t.Helper()
	hs, err := certs.ParseHosts(hosts...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certs.Init(dir, hs, time.Hour); err != nil {
		t.Fatal(err)
	}
	files := map[string]client.TLSFiles{}
	for _, h := range hs {
		files[h.Name] = client.TLSFiles{
			Cert: filepath.Join(dir, h.Name+".crt"), Key: filepath.Join(dir, h.Name+".key"), CA: filepath.Join(dir, certs.CACertFile),
		}
	}
	return files
}

// whoami answers Version with the identity of the caller's certificate.
type whoami struct {
	migratev1.UnimplementedControlServer
}

func (whoami) Version(ctx context.Context, _ *migratev1.VersionRequest) (*migratev1.VersionResponse, error) {
	return &migratev1.VersionResponse{Hostname: agent.PeerIdentity(ctx)}, nil
}

// startServer serves the Control API over TLS the way the agent's remote
// control does, on each of addrs; it returns the bound addresses.
func startServer(t *testing.T, files client.TLSFiles, addrs ...string) []string {
	t.Helper()
	cfg, _, err := agent.LoadTLS(agent.TLSFiles(files), nil)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	migratev1.RegisterControlServer(srv, whoami{})
	var bound []string
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			t.Fatal(err)
		}
		bound = append(bound, ln.Addr().String())
		go srv.Serve(ln)
	}
	t.Cleanup(srv.Stop)
	return bound
}

func TestDialTLS(t *testing.T) {
	dir := t.TempDir()
	pki := writePKI(t, filepath.Join(dir, "pki"), "agent=127.0.0.1", "orch")
	other := writePKI(t, filepath.Join(dir, "other"), "orch")
	addrs := startServer(t, pki["agent"], "127.0.0.1:0", "127.0.0.2:0")
	_, port, _ := net.SplitHostPort(addrs[0])

	for _, tt := range []struct {
		name       string
		addr       string
		files      client.TLSFiles
		serverName string
		want       codes.Code
		wantMsg    string
	}{
		{name: "server name from the address", addr: addrs[0], files: pki["orch"], want: codes.OK},
		{name: "server name given", addr: addrs[1], files: pki["orch"], serverName: "agent", want: codes.OK},
		{name: "address the certificate does not name", addr: addrs[1], files: pki["orch"], want: codes.Unavailable, wantMsg: "127.0.0.2"},
		{name: "server name the certificate does not name", addr: addrs[0], files: pki["orch"], serverName: "elsewhere", want: codes.Unavailable, wantMsg: "elsewhere"},
		{name: "another CA", addr: addrs[0], files: other["orch"], want: codes.Unavailable, wantMsg: "certificate"},
		{name: "host name resolved", addr: net.JoinHostPort("localhost", port), files: pki["orch"], serverName: "agent", want: codes.OK},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := client.LoadTLS(tt.files)
			if err != nil {
				t.Fatal(err)
			}
			cfg.ServerName = tt.serverName
			c, err := client.DialTLS(tt.addr, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if cfg.ServerName != tt.serverName {
				t.Errorf("DialTLS changed the caller's ServerName to %q", cfg.ServerName)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			v, err := c.Version(ctx)
			if status.Code(err) != tt.want || err != nil && !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("Version: %v; want code %s with %q", err, tt.want, tt.wantMsg)
			}
			if err == nil && v.Hostname != "orch" {
				t.Errorf("the agent saw the client as %q, want orch: the client certificate was not presented", v.Hostname)
			}
		})
	}
}

func TestDialTLSRefusesBadArguments(t *testing.T) {
	pki := writePKI(t, filepath.Join(t.TempDir(), "pki"), "orch")
	cfg, err := client.LoadTLS(pki["orch"])
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"host2", "host2:", ":7447", ""} {
		if c, err := client.DialTLS(addr, cfg); err == nil || !strings.Contains(err.Error(), "HOST:PORT") {
			if c != nil {
				c.Close()
			}
			t.Errorf("DialTLS(%q): %v, want an error asking for HOST:PORT", addr, err)
		}
	}
	noCert := &tls.Config{RootCAs: cfg.RootCAs}
	for name, cfg := range map[string]*tls.Config{"nil": nil, "no certificate": noCert} {
		if _, err := client.DialTLS("host2:7447", cfg); !errors.Is(err, client.ErrTLSConfig) {
			t.Errorf("DialTLS with %s configuration: %v, want ErrTLSConfig", name, err)
		}
	}
}

func TestLoadTLSNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	pki := writePKI(t, filepath.Join(dir, "pki"), "orch")
	notPEM := filepath.Join(dir, "not-pem")
	if err := os.WriteFile(notPEM, []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.crt")
	for _, tt := range []struct {
		name string
		edit func(*client.TLSFiles)
		want string
	}{
		{"missing certificate", func(f *client.TLSFiles) { f.Cert = missing }, missing},
		{"key of another certificate", func(f *client.TLSFiles) { f.Key = filepath.Join(dir, "pki", certs.CAKeyFile) }, "private key does not match"},
		{"missing CA", func(f *client.TLSFiles) { f.CA = missing }, missing},
		{"CA without a certificate", func(f *client.TLSFiles) { f.CA = notPEM }, notPEM},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := pki["orch"]
			tt.edit(&f)
			_, err := client.LoadTLS(f)
			if !errors.Is(err, client.ErrTLSConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("LoadTLS: %v; want ErrTLSConfig naming %q", err, tt.want)
			}
		})
	}
}
