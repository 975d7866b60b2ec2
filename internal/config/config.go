package config

import (
	"errors"
	"flag"
	"fmt"
	"golang.org/x/sys/unix"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// DefaultPath is where the daemon looks for its configuration file.
const DefaultPath = "/etc/migrated/config"

// Config is every setting of the daemon.
type Config struct {
	// Socket is the Control API's unix socket.
	Socket string `toml:"socket"`
	// SocketGroup is the group (name or gid) of the control socket; its
	// members may read (list, status, watch). Empty: root only.
	SocketGroup string `toml:"socket_group"`
	// GroupMayMove lets members of SocketGroup move and cancel too.
	GroupMayMove bool `toml:"group_may_move"`
	// Listen is the Peer API's TCP address.
	Listen string `toml:"listen"`
	// StateDir holds the journal.
	StateDir string `toml:"state_dir"`
	// WorkDir holds migrations' work directories (default STATE_DIR/work).
	WorkDir string `toml:"work_dir"`
	// CRIU is the criu binary.
	CRIU string `toml:"criu"`
	// Insecure serves the Peer API over plain TCP.
	Insecure bool `toml:"insecure"`
	// LogJSON logs JSON lines; LogLevel is trace, debug, info, warn or
	// error.
	LogJSON  bool   `toml:"log_json"`
	LogLevel string `toml:"log_level"`
	// MetricsListen serves Prometheus metrics over HTTP at /metrics;
	// empty: off.
	MetricsListen string `toml:"metrics_listen"`

	TLS     TLS     `toml:"tls"`
	Control Control `toml:"control"`
	Limits  Limits  `toml:"limits"`
}

// TLS is the agent's mutual TLS identity.
type TLS struct {
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
	CA   string `toml:"ca"`
	// PeerAllow lists the peer identities (certificate DNS or IP SANs)
	// that may migrate to this host; empty: any certificate of the CA.
	PeerAllow []string `toml:"peer_allow"`
}

// Control is remote control of the agent over TCP.
type Control struct {
	// Listen is a TCP address for the Control API with mutual TLS;
	// empty: unix socket only.
	Listen string `toml:"listen"`
	// Allow lists the client identities (certificate DNS or IP SANs) that
	// may control the agent over TCP; required with Listen.
	Allow []string `toml:"allow"`
}

// Limits bound what peers may make this agent do.
type Limits struct {
	// MaxMessage bounds one gRPC message on the Peer API.
	MaxMessage Size `toml:"max_message"`
	// MaxConcurrent bounds migrations in flight to this host.
	MaxConcurrent int `toml:"max_concurrent"`
	// MaxPerPeer bounds one peer's migrations in flight to this host.
	MaxPerPeer int `toml:"max_per_peer"`
	// StoreBudget bounds each incoming migration's page store in memory;
	// beyond it pages spill to the work directory.
	StoreBudget Size `toml:"store_budget"`
	// MaxImages bounds one incoming migration's non-memory images.
	MaxImages Size `toml:"max_images"`
}

// Default returns the built-in defaults.
func Default() Config {
	return Config{
		Socket:   "/run/migrated/migrated.sock",
		Listen:   ":7446",
		StateDir: "/var/lib/migrated",
		CRIU:     "criu",
		LogLevel: "info",
		Limits: Limits{
			MaxMessage:    16 << 20,
			MaxConcurrent: 4,
			MaxPerPeer:    2,
			StoreBudget:   1 << 30,
			MaxImages:     1 << 30,
		},
	}
}

// Load reads a TOML file over base. Unknown keys and values of the wrong
// type are errors that name the key.
func Load(path string, base Config) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return base, fmt.Errorf("config file: %w", err)
	}
	c := base
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return base, fmt.Errorf("%w: %s: %s", ErrInvalid, path, pe.ErrorWithPosition())
		}
		return base, fmt.Errorf("%w: %s: %v", ErrInvalid, path, err)
	}
	if u := md.Undecoded(); len(u) > 0 {
		keys := make([]string, len(u))
		for i, k := range u {
			keys[i] = k.String()
		}
		return base, fmt.Errorf("%w: %s: unknown key(s) %s", ErrInvalid, path, strings.Join(keys, ", "))
	}
	return c, nil
}

// Size is a number of bytes; in the file an integer or a string with a
// suffix (K, KiB, M, MiB, G, GiB; all binary).
type Size int64

// UnmarshalTOML implements toml.Unmarshaler.
func (s *Size) UnmarshalTOML(v any) error {
	switch x := v.(type) {
	case int64:
		if x < 0 {
			return fmt.Errorf("negative size %d", x)
		}
		*s = Size(x)
		return nil
	case string:
		n, err := ParseSize(x)
		if err != nil {
			return err
		}
		*s = n
		return nil
	}
	return fmt.Errorf("size must be an integer or a string like \"16MiB\", not %T", v)
}

// ParseSize parses "1048576", "512K", "16MiB", "1G".
func ParseSize(s string) (Size, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.m
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q (want bytes or a number with K, M or G)", s)
	}
	return Size(n * mult), nil
}

func (s Size) String() string {
	switch {
	case s != 0 && s%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", s>>30)
	case s != 0 && s%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", s>>20)
	case s != 0 && s%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", s>>10)
	}
	return strconv.FormatInt(int64(s), 10)
}

// Validate checks every setting and returns the first problem as a
// *KeyError naming the key and its flag. It only looks at values, not at
// the system (files, groups, ports).
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error {
		return &KeyError{Key: key, Flag: flagOf(key), Msg: fmt.Sprintf(format, a...)}
	}
	if !filepath.IsAbs(c.Socket) {
		return bad("socket", "%q is not an absolute path", c.Socket)
	}
	if len(c.Socket) >= 108 {
		return bad("socket", "%q is longer than a unix socket path may be (107 bytes)", c.Socket)
	}
	if err := checkAddr(c.Listen); err != nil {
		return bad("listen", "%v", err)
	}
	if !filepath.IsAbs(c.StateDir) {
		return bad("state_dir", "%q is not an absolute path", c.StateDir)
	}
	if c.WorkDir != "" && !filepath.IsAbs(c.WorkDir) {
		return bad("work_dir", "%q is not an absolute path", c.WorkDir)
	}
	if c.CRIU == "" {
		return bad("criu", "empty")
	}
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "error":
	default:
		return bad("log_level", "%q is not one of trace, debug, info, warn, error", c.LogLevel)
	}
	if c.MetricsListen != "" {
		if err := checkAddr(c.MetricsListen); err != nil {
			return bad("metrics_listen", "%v", err)
		}
	}
	tlsSet := c.TLS.Cert != "" || c.TLS.Key != "" || c.TLS.CA != ""
	switch {
	case c.Insecure && tlsSet:
		return bad("insecure", "true while tls.cert, tls.key or tls.ca is set: choose mutual TLS or plain TCP")
	case c.Insecure && len(c.TLS.PeerAllow) > 0:
		return bad("tls.peer_allow", "needs mutual TLS (it names certificate identities) but insecure = true")
	case !c.Insecure:
		for _, k := range []struct{ key, v string }{{"tls.cert", c.TLS.Cert}, {"tls.key", c.TLS.Key}, {"tls.ca", c.TLS.CA}} {
			if k.v == "" {
				return bad(k.key, "missing: the Peer API needs mutual TLS (tls.cert, tls.key, tls.ca); set insecure = true (--insecure) to serve it over plain TCP on a trusted network")
			}
		}
	}
	for _, a := range c.TLS.PeerAllow {
		if strings.TrimSpace(a) == "" || strings.ContainsAny(a, " ,") {
			return bad("tls.peer_allow", "entry %q is not a DNS name or IP address", a)
		}
	}
	if c.Control.Listen != "" {
		if err := checkAddr(c.Control.Listen); err != nil {
			return bad("control.listen", "%v", err)
		}
		if c.Insecure {
			return bad("control.listen", "remote control needs mutual TLS but insecure = true")
		}
		if len(c.Control.Allow) == 0 {
			return bad("control.allow", "empty: remote control (control.listen) needs the list of client identities that may use it")
		}
	}
	for _, a := range c.Control.Allow {
		if strings.TrimSpace(a) == "" || strings.ContainsAny(a, " ,") {
			return bad("control.allow", "entry %q is not a DNS name or IP address", a)
		}
	}
	l := c.Limits
	switch {
	case l.MaxMessage < 4<<20 || l.MaxMessage > 256<<20:
		return bad("limits.max_message", "%s is outside 4MiB..256MiB (page batches need a few MiB)", l.MaxMessage)
	case l.MaxConcurrent < 1 || l.MaxConcurrent > 256:
		return bad("limits.max_concurrent", "%d is outside 1..256", l.MaxConcurrent)
	case l.MaxPerPeer < 0 || l.MaxPerPeer > l.MaxConcurrent:
		return bad("limits.max_per_peer", "%d is outside 0..limits.max_concurrent (%d); 0 means no per-peer bound", l.MaxPerPeer, l.MaxConcurrent)
	case l.StoreBudget < 1<<20:
		return bad("limits.store_budget", "%s is below 1MiB", l.StoreBudget)
	case l.MaxImages < 1<<20:
		return bad("limits.max_images", "%s is below 1MiB", l.MaxImages)
	}
	return nil
}

func checkAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q is not HOST:PORT: %v", a, err)
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("%q: bad port %q", a, port)
	}
	_ = host
	return nil
}

// key describes one setting: its file key, flag, usage and how a flag value
// sets it.
type key struct {
	name, flag, usage string
	boolean           bool
	set               func(c *Config, v string) error
}

func strKey(name, flag, usage string, f func(*Config) *string) key {
	return key{name: name, flag: flag, usage: usage, set: func(c *Config, v string) error { *f(c) = v; return nil }}
}

func boolKey(name, flag, usage string, f func(*Config) *bool) key {
	return key{name: name, flag: flag, usage: usage, boolean: true, set: func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%q is not a boolean", v)
		}
		*f(c) = b
		return nil
	}}
}

func intKey(name, flag, usage string, f func(*Config) *int) key {
	return key{name: name, flag: flag, usage: usage, set: func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("%q is not an integer", v)
		}
		*f(c) = n
		return nil
	}}
}

func sizeKey(name, flag, usage string, f func(*Config) *Size) key {
	return key{name: name, flag: flag, usage: usage, set: func(c *Config, v string) error {
		n, err := ParseSize(v)
		if err != nil {
			return err
		}
		*f(c) = n
		return nil
	}}
}

// listKey appends: the flag may be repeated and takes comma-separated
// values; the first use on the command line replaces the file's list.
func listKey(name, flag, usage string, f func(*Config) *[]string) key {
	return key{name: name, flag: flag, usage: usage, set: func(c *Config, v string) error {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				*f(c) = append(*f(c), s)
			}
		}
		return nil
	}}
}

// keys lists every setting: file key, flag and usage.
var keys = []key{
	strKey("socket", "socket", "Control API unix socket", func(c *Config) *string { return &c.Socket }),
	strKey("socket_group", "socket-group", "group (name or gid) of the control socket; its members may list and watch", func(c *Config) *string { return &c.SocketGroup }),
	boolKey("group_may_move", "group-may-move", "members of the socket group may also move and cancel", func(c *Config) *bool { return &c.GroupMayMove }),
	strKey("listen", "listen", "Peer API listen address", func(c *Config) *string { return &c.Listen }),
	strKey("state_dir", "state-dir", "journal and state directory", func(c *Config) *string { return &c.StateDir }),
	strKey("work_dir", "work-dir", "migration work directories (default /run/migrated/work on a tmpfs /run, else STATE_DIR/work)", func(c *Config) *string { return &c.WorkDir }),
	strKey("criu", "criu", "path of the criu binary", func(c *Config) *string { return &c.CRIU }),
	boolKey("insecure", "insecure", "serve the Peer API over plain TCP (tests and trusted labs only)", func(c *Config) *bool { return &c.Insecure }),
	boolKey("log_json", "log-json", "log JSON lines", func(c *Config) *bool { return &c.LogJSON }),
	strKey("log_level", "log-level", "log level: trace, debug, info, warn, error", func(c *Config) *string { return &c.LogLevel }),
	strKey("metrics_listen", "metrics-listen", "serve Prometheus metrics on HOST:PORT/metrics (off when empty)", func(c *Config) *string { return &c.MetricsListen }),
	strKey("tls.cert", "tls-cert", "this agent's certificate (PEM)", func(c *Config) *string { return &c.TLS.Cert }),
	strKey("tls.key", "tls-key", "this agent's private key (PEM)", func(c *Config) *string { return &c.TLS.Key }),
	strKey("tls.ca", "tls-ca", "the CA that signs every agent's certificate (PEM)", func(c *Config) *string { return &c.TLS.CA }),
	listKey("tls.peer_allow", "peer-allow", "peer identities (certificate DNS or IP SANs) that may migrate here; comma-separated, repeatable", func(c *Config) *[]string { return &c.TLS.PeerAllow }),
	strKey("control.listen", "control-listen", "TCP address for remote control with mutual TLS (off when empty)", func(c *Config) *string { return &c.Control.Listen }),
	listKey("control.allow", "control-allow", "client identities that may control this agent over TCP; comma-separated, repeatable", func(c *Config) *[]string { return &c.Control.Allow }),
	sizeKey("limits.max_message", "max-message", "largest Peer API message", func(c *Config) *Size { return &c.Limits.MaxMessage }),
	intKey("limits.max_concurrent", "max-concurrent", "migrations in flight to this host", func(c *Config) *int { return &c.Limits.MaxConcurrent }),
	intKey("limits.max_per_peer", "max-per-peer", "migrations in flight to this host from one peer (0: no per-peer bound)", func(c *Config) *int { return &c.Limits.MaxPerPeer }),
	sizeKey("limits.store_budget", "store-budget", "memory of one incoming migration's page store before it spills to disk", func(c *Config) *Size { return &c.Limits.StoreBudget }),
	sizeKey("limits.max_images", "max-images", "largest total of one incoming migration's non-memory images", func(c *Config) *Size { return &c.Limits.MaxImages }),
}

func flagOf(name string) string {
	for _, k := range keys {
		if k.name == name {
			return k.flag
		}
	}
	return ""
}

// Keys returns the file keys and their flags, in documentation order.
func Keys() [][2]string {
	out := make([][2]string, len(keys))
	for i, k := range keys {
		out[i] = [2]string{k.name, k.flag}
	}
	return out
}

// Flags registers a flag for every setting on fs. The returned function
// applies the flags that were given, in command-line order, to a Config
// loaded from defaults and the file.
func Flags(fs *flag.FlagSet) func(*Config) error {
	type given struct {
		k key
		v string
	}
	var set []given
	def := Default()
	for _, k := range keys {
		k := k
		usage := k.usage
		if d := defaultOf(def, k); d != "" {
			usage += " (default " + d + ")"
		}
		usage += " [config: " + k.name + "]"
		fs.Var(&flagValue{boolean: k.boolean, set: func(v string) error {
			// Check now, so that a bad value is reported by the flag parser.
			var scratch Config
			if err := k.set(&scratch, v); err != nil {
				return err
			}
			set = append(set, given{k, v})
			return nil
		}}, k.flag, usage)
	}
	return func(c *Config) error {
		cleared := map[string]bool{}
		for _, g := range set {
			if !cleared[g.k.name] {
				cleared[g.k.name] = true
				clearList(c, g.k.name)
			}
			if err := g.k.set(c, g.v); err != nil {
				return &KeyError{Key: g.k.name, Flag: g.k.flag, Msg: err.Error()}
			}
		}
		return nil
	}
}

func clearList(c *Config, name string) {
	switch name {
	case "tls.peer_allow":
		c.TLS.PeerAllow = nil
	case "control.allow":
		c.Control.Allow = nil
	}
}

func defaultOf(d Config, k key) string {
	switch k.name {
	case "socket":
		return d.Socket
	case "listen":
		return d.Listen
	case "state_dir":
		return d.StateDir
	case "criu":
		return d.CRIU
	case "log_level":
		return d.LogLevel
	case "limits.max_message":
		return d.Limits.MaxMessage.String()
	case "limits.max_concurrent":
		return strconv.Itoa(d.Limits.MaxConcurrent)
	case "limits.max_per_peer":
		return strconv.Itoa(d.Limits.MaxPerPeer)
	case "limits.store_budget":
		return d.Limits.StoreBudget.String()
	case "limits.max_images":
		return d.Limits.MaxImages.String()
	}
	return ""
}

type flagValue struct {
	boolean bool
	set     func(string) error
	last    string
}

func (f *flagValue) String() string { return f.last }
func (f *flagValue) Set(v string) error {
	f.last = v
	return f.set(v)
}
func (f *flagValue) IsBoolFlag() bool { return f.boolean }

// Resolve loads the configuration the daemon runs with: defaults, then the
// file at path (a missing file is an error unless optional), then apply
// (from Flags), then Validate.
func Resolve(path string, optional bool, apply func(*Config) error) (Config, error) {
	c := Default()
	if path != "" {
		loaded, err := Load(path, c)
		switch {
		case err == nil:
			c = loaded
		case optional && errors.Is(err, fs.ErrNotExist):
		default:
			return c, err
		}
	}
	if apply != nil {
		if err := apply(&c); err != nil {
			return c, err
		}
	}
	if err := c.Validate(); err != nil {
		return c, err
	}
	if c.WorkDir == "" {
		c.WorkDir = DefaultWorkDir(c.StateDir)
	}
	return c, nil
}

// DefaultWorkDir is where work directories go when work_dir is not set:
// /run/migrated/work when /run is a tmpfs (received pages and images then
// stay in memory, and a restore reads them at memory speed), else
// STATE_DIR/work.
func DefaultWorkDir(stateDir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err == nil && st.Type == unix.TMPFS_MAGIC {
		return "/run/migrated/work"
	}
	return filepath.Join(stateDir, "work")
}
