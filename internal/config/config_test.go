package config

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const fullFile = `
socket = "/run/m/m.sock"
socket_group = "migrated"
group_may_move = true
listen = "10.0.0.1:7446"
state_dir = "/var/lib/m"
log_level = "debug"
metrics_listen = "127.0.0.1:9446"

[tls]
cert = "/etc/migrated/tls/a.crt"
key = "/etc/migrated/tls/a.key"
ca = "/etc/migrated/tls/ca.crt"
peer_allow = ["hostB", "10.0.0.2"]

[limits]
max_message = "32MiB"
max_concurrent = 8
max_per_peer = 3
store_budget = 268435456
max_images = "2GiB"
`

func TestLoadFile(t *testing.T) {
	c, err := Resolve(writeFile(t, fullFile), false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/run/m/m.sock" || c.SocketGroup != "migrated" || !c.GroupMayMove || c.Listen != "10.0.0.1:7446" ||
		c.TLS.Cert != "/etc/migrated/tls/a.crt" || strings.Join(c.TLS.PeerAllow, ",") != "hostB,10.0.0.2" ||
		c.Limits.MaxMessage != 32<<20 || c.Limits.MaxConcurrent != 8 || c.Limits.MaxPerPeer != 3 ||
		c.Limits.StoreBudget != 256<<20 || c.Limits.MaxImages != 2<<30 || c.MetricsListen != "127.0.0.1:9446" {
		t.Fatalf("loaded %+v", c)
	}
	if c.WorkDir != DefaultWorkDir("/var/lib/m") {
		t.Fatalf("work dir %q, want STATE_DIR/work", c.WorkDir)
	}
	if c.CRIU != "criu" {
		t.Fatalf("unset key lost its default: criu = %q", c.CRIU)
	}
}

func TestFlagsOverrideFile(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	apply := Flags(fs)
	if err := fs.Parse([]string{"--listen", "127.0.0.1:1", "--peer-allow", "hostC,hostD", "--peer-allow", "hostE",
		"--max-concurrent", "2", "--max-per-peer=1", "--group-may-move=false", "--store-budget", "64M"}); err != nil {
		t.Fatal(err)
	}
	c, err := Resolve(writeFile(t, fullFile), false, apply)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:1" || strings.Join(c.TLS.PeerAllow, ",") != "hostC,hostD,hostE" || c.Limits.MaxConcurrent != 2 ||
		c.Limits.MaxPerPeer != 1 || c.GroupMayMove || c.Limits.StoreBudget != 64<<20 {
		t.Fatalf("flags did not override: %+v", c)
	}
	if c.Socket != "/run/m/m.sock" {
		t.Fatalf("a key no flag set changed: %q", c.Socket)
	}
}

func TestResolveMissingFile(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	apply := Flags(fs)
	if err := fs.Parse([]string{"--insecure"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Resolve("/nonexistent/config", true, apply); err != nil {
		t.Fatalf("optional missing file: %v", err)
	}
	if _, err := Resolve("/nonexistent/config", false, apply); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("explicit missing file: %v", err)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	tlsOK := "[tls]\ncert = \"/a\"\nkey = \"/b\"\nca = \"/c\"\n"
	for _, tc := range []struct {
		name, file string
		want       string
	}{
		{"no TLS and not insecure", "", "tls.cert (--tls-cert): missing"},
		{"insecure with TLS", "insecure = true\n" + tlsOK, "config key insecure (--insecure)"},
		{"allow-list without TLS", "insecure = true\n[tls]\npeer_allow = [\"a\"]\n", "tls.peer_allow"},
		{"unknown key", "insecure = true\nlisten_addr = \":1\"\n", "unknown key(s) listen_addr"},
		{"unknown key in a section", "insecure = true\n[limits]\nmax_concurent = 3\n", "limits.max_concurent"},
		{"wrong type", "insecure = true\n[limits]\nmax_concurrent = \"many\"\n", "max_concurrent"},
		{"bad size", "insecure = true\n[limits]\nstore_budget = \"lots\"\n", "invalid size \"lots\""},
		{"syntax", "insecure = \n", "line 1"},
		{"relative socket", "insecure = true\nsocket = \"m.sock\"\n", "config key socket (--socket)"},
		{"bad listen", "insecure = true\nlisten = \"7446\"\n", "config key listen (--listen)"},
		{"bad level", "insecure = true\nlog_level = \"loud\"\n", "config key log_level"},
		{"limit out of range", "insecure = true\n[limits]\nmax_concurrent = 0\n", "limits.max_concurrent (--max-concurrent)"},
		{"per-peer above total", "insecure = true\n[limits]\nmax_concurrent = 2\nmax_per_peer = 3\n", "limits.max_per_peer"},
		{"tiny message limit", "insecure = true\n[limits]\nmax_message = \"1K\"\n", "limits.max_message"},
		{"remote control without allow-list", tlsOK + "[control]\nlisten = \":7447\"\n", "control.allow"},
		{"remote control insecure", "insecure = true\n[control]\nlisten = \":7447\"\nallow = [\"o\"]\n", "control.listen"},
		{"bad metrics address", "insecure = true\nmetrics_listen = \"x\"\n", "metrics_listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Resolve(writeFile(t, tc.file), false, nil)
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrInvalid naming %q", err, tc.want)
			}
		})
	}
}

func TestBadFlagValue(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	Flags(fs)
	err := fs.Parse([]string{"--max-concurrent", "four"})
	if err == nil || !strings.Contains(err.Error(), "max-concurrent") {
		t.Fatalf("bad flag value: %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]Size{"0": 0, "4096": 4096, "512K": 512 << 10, "16MiB": 16 << 20, "1G": 1 << 30, "2 GiB": 2 << 30, "10B": 10} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1T", "x", "1.5G", "99999999999G"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func TestEveryKeyHasAFlagAndADocumentedExample(t *testing.T) {
	example, err := os.ReadFile("../../deploy/systemd/config.example")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range Keys() {
		name := k[0]
		if i := strings.LastIndexByte(name, '.'); i >= 0 {
			name = name[i+1:]
		}
		if k[1] == "" || !strings.Contains(string(example), name) {
			t.Errorf("key %s (flag %q) is not in deploy/systemd/config.example", k[0], k[1])
		}
	}
	// The example itself is a valid configuration once TLS files exist.
	if _, err := Load("../../deploy/systemd/config.example", Default()); err != nil {
		t.Fatalf("config.example: %v", err)
	}
}
