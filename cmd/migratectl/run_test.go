package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/migrated/migrated/pkg/client"
)

func TestUsageGolden(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "usage.txt")
	if *update {
		if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("usage differs from %s:\n--- got\n%s\n--- want\n%s", golden, out.Bytes(), want)
	}
}

// clearEnv unsets the global flags' environment variables for the test.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{"MIGRATED_SOCKET", "MIGRATED_ADDR", "MIGRATED_TLS_CERT", "MIGRATED_TLS_KEY", "MIGRATED_TLS_CA"} {
		t.Setenv(k, "")
	}
}

func TestParseGlobals(t *testing.T) {
	files := client.TLSFiles{Cert: "o.crt", Key: "o.key", CA: "ca.crt"}
	for _, tt := range []struct {
		name    string
		env     map[string]string
		args    []string
		want    globals
		wantErr string
	}{
		{name: "defaults", args: []string{"list"}, want: globals{socket: client.DefaultSocket}},
		{name: "socket forms", args: []string{"-socket", "/a", "--socket=/b", "list"}, want: globals{socket: "/b"}},
		{name: "socket from the environment", env: map[string]string{"MIGRATED_SOCKET": "/e"}, args: []string{"list"}, want: globals{socket: "/e"}},
		{
			name: "remote from flags",
			args: []string{"--addr", "host2:7447", "--tls-cert", "o.crt", "--tls-key=o.key", "-tls-ca", "ca.crt", "list"},
			want: globals{socket: client.DefaultSocket, addr: "host2:7447", tls: files},
		},
		{
			name: "remote from the environment",
			env:  map[string]string{"MIGRATED_ADDR": "host2:7447", "MIGRATED_TLS_CERT": "o.crt", "MIGRATED_TLS_KEY": "o.key", "MIGRATED_TLS_CA": "ca.crt"},
			args: []string{"list"},
			want: globals{socket: client.DefaultSocket, addr: "host2:7447", tls: files},
		},
		{
			name: "flags override the environment",
			env:  map[string]string{"MIGRATED_ADDR": "host2:7447", "MIGRATED_TLS_CERT": "e.crt"},
			args: []string{"--addr", "host3:7447", "--tls-cert", "o.crt", "list"},
			want: globals{socket: client.DefaultSocket, addr: "host3:7447", tls: client.TLSFiles{Cert: "o.crt"}},
		},
		{
			name: "socket flag over the address in the environment",
			env:  map[string]string{"MIGRATED_ADDR": "host2:7447", "MIGRATED_TLS_CERT": "o.crt"},
			args: []string{"--socket", "/s", "list"},
			want: globals{socket: "/s", tls: client.TLSFiles{Cert: "o.crt"}},
		},
		{name: "socket and addr", args: []string{"--socket", "/s", "--addr", "h:1", "list"}, wantErr: "--socket and --addr exclude each other"},
		{name: "TLS files without addr", args: []string{"--tls-cert", "o.crt", "list"}, wantErr: "give --addr HOST:PORT too"},
		{name: "missing value", args: []string{"--addr"}, wantErr: "--addr needs a value"},
		{name: "empty value", args: []string{"--addr=", "list"}, wantErr: "--addr needs a value"},
		{name: "unknown flag", args: []string{"--sockets", "/s", "list"}, wantErr: "unknown flag --sockets"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			g, rest, help, err := parseGlobals(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || help {
				t.Fatalf("parseGlobals: %v (help %v)", err, help)
			}
			if g != tt.want {
				t.Errorf("globals %+v, want %+v", g, tt.want)
			}
			if len(rest) != 1 || rest[0] != "list" {
				t.Errorf("remaining arguments %q, want [list]", rest)
			}
		})
	}
}

func TestRemoteNeedsTLSFiles(t *testing.T) {
	clearEnv(t)
	t.Setenv("MIGRATED_TLS_CERT", "o.crt")
	err := run(context.Background(), []string{"--addr", "host2:7447", "list"}, io.Discard, io.Discard)
	want := "remote control needs --tls-cert, --tls-key and --tls-ca: --tls-key, --tls-ca not given"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("run with --addr and only a certificate: %v, want %q", err, want)
	}
	err = run(context.Background(), []string{"--addr", "host2:7447", "--tls-key", "o.key", "--tls-ca", "missing-ca.crt", "list"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "o.crt") {
		t.Fatalf("run with unreadable TLS files: %v, want an error naming the certificate", err)
	}
}
