package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/status"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/buildinfo"
	"github.com/migrated/migrated/pkg/client"
)

const usage = `usage: migratectl [GLOBAL FLAGS] COMMAND [ARGS]

Commands:
  move PID --to HOST[:PORT] [--mode precopy|stopcopy] [--downtime-target DUR]
       [--max-rounds N] [--bandwidth RATE] [--compress zstd|none]
       [--tcp-established] [--shell-job] [--id ID] [--json]
                           migrate a process tree to HOST; exit 0 only when it runs there
  check PID --to HOST      preflight a move without touching the process
  list [--json]            list migrations this agent knows
  status ID [--json]       show one migration
  watch ID [--json]        follow a running migration
  cancel ID                stop a migration before its commit point
  version                  versions and capabilities of this agent
  certs init DIR --host NAME=IP[,IP...] [--host ...]
                           create a CA and host certificates for mutual TLS

Global flags (each also read from the environment variable in brackets):
  --socket PATH            agent control socket on this host
                           (default /run/migrated/migrated.sock) [MIGRATED_SOCKET]
  --addr HOST:PORT         remote control: the agent's control.listen address,
                           over mutual TLS instead of the socket [MIGRATED_ADDR]
  --tls-cert FILE          client certificate for --addr; one of its names must be
                           on the agent's control.allow [MIGRATED_TLS_CERT]
  --tls-key FILE           key of --tls-cert [MIGRATED_TLS_KEY]
  --tls-ca FILE            CA that signed the agent's certificate [MIGRATED_TLS_CA]
`

// globals are the global flags: which agent to talk to and how.
type globals struct {
	socket string
	// addr, when set, selects remote control over mutual TLS with tls.
	addr string
	tls  client.TLSFiles
}

// parseGlobals reads the global flags at the front of args (--name VALUE,
// --name=VALUE or -name), which override their environment variables, and
// returns the remaining arguments. An address selects remote control unless
// --socket is on the command line; --socket and --addr together are an
// error. help reports -h or --help.
func parseGlobals(args []string) (g globals, rest []string, help bool, err error) {
	g.socket = client.DefaultSocket
	flags := []struct {
		name, env string
		v         *string
	}{
		{"socket", "MIGRATED_SOCKET", &g.socket},
		{"addr", "MIGRATED_ADDR", &g.addr},
		{"tls-cert", "MIGRATED_TLS_CERT", &g.tls.Cert},
		{"tls-key", "MIGRATED_TLS_KEY", &g.tls.Key},
		{"tls-ca", "MIGRATED_TLS_CA", &g.tls.CA},
	}
	for _, f := range flags {
		if v := os.Getenv(f.env); v != "" {
			*f.v = v
		}
	}
	given := map[string]bool{}
next:
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		if args[0] == "-h" || args[0] == "--help" {
			return g, nil, true, nil
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(args[0], "-"), "=")
		for _, f := range flags {
			if name != f.name {
				continue
			}
			if !hasValue {
				if len(args) < 2 {
					return g, nil, false, fmt.Errorf("--%s needs a value", f.name)
				}
				value, args = args[1], args[1:]
			}
			if value == "" {
				return g, nil, false, fmt.Errorf("--%s needs a value", f.name)
			}
			*f.v, args = value, args[1:]
			given[f.name] = true
			continue next
		}
		return g, nil, false, fmt.Errorf("unknown flag %s", args[0])
	}
	switch {
	case given["socket"] && given["addr"]:
		return g, nil, false, errors.New("--socket and --addr exclude each other: give the local socket or a remote agent")
	case given["socket"]:
		g.addr = ""
	case g.addr == "" && (given["tls-cert"] || given["tls-key"] || given["tls-ca"]):
		return g, nil, false, errors.New("--tls-cert, --tls-key and --tls-ca are for remote control: give --addr HOST:PORT too")
	}
	return g, args, false, nil
}

// dial connects to the agent g names: the socket, or the remote Control
// API over mutual TLS.
func (g globals) dial() (*client.Client, error) {
	if g.addr == "" {
		return client.Dial(g.socket)
	}
	var missing []string
	for _, f := range []struct{ name, v string }{{"--tls-cert", g.tls.Cert}, {"--tls-key", g.tls.Key}, {"--tls-ca", g.tls.CA}} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("remote control needs --tls-cert, --tls-key and --tls-ca: %s not given (flags or MIGRATED_TLS_CERT, MIGRATED_TLS_KEY, MIGRATED_TLS_CA)",
			strings.Join(missing, ", "))
	}
	cfg, err := client.LoadTLS(g.tls)
	if err != nil {
		return nil, fmt.Errorf("remote control %s: %w", g.addr, err)
	}
	return client.DialTLS(g.addr, cfg)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	g, args, help, err := parseGlobals(args)
	if help {
		fmt.Fprint(stdout, usage)
		return nil
	}
	if err != nil {
		fmt.Fprint(stderr, usage)
		return err
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command")
	}
	cmd, args := args[0], args[1:]
	if cmd == "help" {
		fmt.Fprint(stdout, usage)
		return nil
	}
	if cmd == "certs" {
		return cmdCerts(args, stdout, stderr)
	}
	c, err := g.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	switch cmd {
	case "move":
		return cmdMove(ctx, c, args, stdout, stderr)
	case "check":
		return cmdCheck(ctx, c, args, stdout)
	case "list":
		return cmdList(ctx, c, args, stdout)
	case "status":
		return cmdStatus(ctx, c, args, stdout)
	case "watch":
		return cmdWatch(ctx, c, args, stdout, stderr)
	case "cancel":
		return cmdCancel(ctx, c, args, stdout)
	case "version":
		return cmdVersion(ctx, c, stdout)
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

// parseInterleaved parses flags that may come before or after positional
// arguments.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func rpcErr(err error) error {
	if st, ok := status.FromError(err); ok {
		return errors.New(st.Message())
	}
	return err
}

func cmdMove(ctx context.Context, c *client.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("move", flag.ContinueOnError)
	fs.SetOutput(stderr)
	to := fs.String("to", "", "destination agent HOST[:PORT]")
	mode := fs.String("mode", "precopy", "precopy or stopcopy")
	target := fs.Duration("downtime-target", 300*time.Millisecond, "downtime the pre-copy policy aims for")
	rounds := fs.Int("max-rounds", 10, "most pre-copy rounds")
	bw := fs.String("bandwidth", "", "bandwidth limit, e.g. 100M (bytes/s, K/M/G suffixes, or 1gbit)")
	compress := fs.String("compress", "none", "zstd or none")
	tcp := fs.Bool("tcp-established", false, "migrate established TCP connections")
	shell := fs.Bool("shell-job", false, "the tree is not a session leader's (CRIU --shell-job)")
	id := fs.String("id", "", "migration id (default: generated)")
	asJSON := fs.Bool("json", false, "print one JSON event per line")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("move needs exactly one PID")
	}
	pid, err := strconv.Atoi(pos[0])
	if err != nil || pid <= 0 {
		return fmt.Errorf("invalid PID %q", pos[0])
	}
	if *to == "" {
		return errors.New("move needs --to HOST")
	}
	req := &migratev1.MoveRequest{
		Pid: int32(pid), Destination: *to, DowntimeTargetMs: uint32(target.Milliseconds()),
		MaxRounds: uint32(*rounds), TcpEstablished: *tcp, ShellJob: *shell, MigrationId: *id,
	}
	switch *mode {
	case "precopy":
		req.Mode = migratev1.Mode_MODE_PRECOPY
	case "stopcopy":
		req.Mode = migratev1.Mode_MODE_STOPCOPY
	default:
		return fmt.Errorf("--mode must be precopy or stopcopy, not %q", *mode)
	}
	switch *compress {
	case "none", "":
		req.Compression = migratev1.Compression_COMPRESSION_NONE
	case "zstd":
		req.Compression = migratev1.Compression_COMPRESSION_ZSTD
	default:
		return fmt.Errorf("--compress must be zstd or none, not %q", *compress)
	}
	if *bw != "" {
		n, err := parseRate(*bw)
		if err != nil {
			return err
		}
		req.BandwidthLimit = n
	}
	stream, err := c.Move(ctx, req)
	if err != nil {
		return rpcErr(err)
	}
	return follow(stream.Recv, stdout, stderr, *asJSON)
}

func cmdWatch(ctx context.Context, c *client.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print one JSON event per line")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("watch needs a migration ID")
	}
	stream, err := c.Watch(ctx, pos[0])
	if err != nil {
		return rpcErr(err)
	}
	return follow(stream.Recv, stdout, stderr, *asJSON)
}

// follow prints events until the last and returns an error unless the
// process was moved.
func follow(recv func() (*migratev1.MoveEvent, error), stdout, stderr io.Writer, asJSON bool) error {
	p := newPrinter(stdout, asJSON)
	var last *migratev1.MoveEvent
	for {
		ev, err := recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			p.flush()
			if last != nil {
				fmt.Fprintf(stderr, "migratectl: lost the agent while migration %s was in phase %s: %v\n  the agent finishes or undoes the migration on its own; see: migratectl status %s\n",
					last.MigrationId, phaseName(last.Phase), rpcErr(err), last.MigrationId)
				return exitError(1)
			}
			return rpcErr(err)
		}
		last = ev
		p.event(ev)
	}
	p.flush()
	if last == nil || last.Outcome == nil {
		return errors.New("the agent ended the stream without an outcome")
	}
	if !last.Outcome.Moved {
		if !asJSON {
			fmt.Fprintf(stderr, "migratectl: migration %s failed in %s: %s\n", last.MigrationId, last.Outcome.FailedPhase, last.Outcome.Error)
			fmt.Fprintf(stderr, "  process now on: %s\n", last.Outcome.ProcessLocation)
			if last.Outcome.Advice != "" {
				fmt.Fprintf(stderr, "  what to do: %s\n", last.Outcome.Advice)
			}
		}
		return exitError(1)
	}
	return nil
}

// parseRate reads a bandwidth: bytes/s with K/M/G (powers of 1024)
// suffixes, or bits/s with kbit/mbit/gbit (powers of 1000).
func parseRate(s string) (uint64, error) {
	ls := strings.ToLower(strings.TrimSpace(s))
	mult := 1.0
	for _, u := range []struct {
		suffix string
		mult   float64
	}{{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"b", 1}} {
		if strings.HasSuffix(ls, u.suffix) {
			ls, mult = strings.TrimSuffix(ls, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(ls, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("invalid bandwidth %q (examples: 100M, 1gbit)", s)
	}
	return uint64(v * mult), nil
}

func cmdCheck(ctx context.Context, c *client.Client, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	to := fs.String("to", "", "destination agent HOST[:PORT]")
	tcp := fs.Bool("tcp-established", false, "migrate established TCP connections")
	shell := fs.Bool("shell-job", false, "CRIU --shell-job")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *to == "" {
		return errors.New("usage: migratectl check PID --to HOST")
	}
	pid, err := strconv.Atoi(pos[0])
	if err != nil {
		return fmt.Errorf("invalid PID %q", pos[0])
	}
	r, err := c.Check(ctx, &migratev1.CheckRequest{Pid: int32(pid), Destination: *to, TcpEstablished: *tcp, ShellJob: *shell})
	if err != nil {
		return rpcErr(err)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(stdout, "  %s\n", n)
	}
	if r.Ok {
		fmt.Fprintf(stdout, "ok: pid %d can move to %s\n", pid, *to)
		return nil
	}
	fmt.Fprintf(stdout, "pid %d cannot move to %s:\n", pid, *to)
	for _, p := range r.Problems {
		fmt.Fprintf(stdout, "  - %s\n", p)
	}
	return exitError(1)
}

func cmdList(ctx context.Context, c *client.Client, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r, err := c.List(ctx)
	if err != nil {
		return rpcErr(err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		for _, m := range r.Migrations {
			if err := enc.Encode(migrationJSON(m)); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tPID\tPEER\tSTATE\tSTARTED")
	for _, m := range r.Migrations {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", m.MigrationId, m.Role, m.Pid, m.Peer, m.State,
			time.UnixMilli(m.StartedUnixMs).Format(time.DateTime))
	}
	return tw.Flush()
}

func cmdStatus(ctx context.Context, c *client.Client, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("status needs a migration ID")
	}
	m, err := c.Get(ctx, pos[0])
	if err != nil {
		return rpcErr(err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(migrationJSON(m))
	}
	fmt.Fprintf(stdout, "migration %s (%s)\n  pid:   %d\n  peer:  %s\n  state: %s\n", m.MigrationId, m.Role, m.Pid, m.Peer, m.State)
	if o := m.Outcome; o != nil {
		if o.DestPid != 0 {
			fmt.Fprintf(stdout, "  destination pid: %d\n", o.DestPid)
		}
		if o.Error != "" {
			fmt.Fprintf(stdout, "  error: %s\n", o.Error)
		}
		if o.ProcessLocation != "" {
			fmt.Fprintf(stdout, "  process on: %s\n", o.ProcessLocation)
		}
	}
	if e := m.LastEvent; e != nil {
		fmt.Fprintf(stdout, "  last event: [%s] %s\n", phaseName(e.Phase), e.Message)
	}
	return nil
}

func cmdCancel(ctx context.Context, c *client.Client, args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return errors.New("cancel needs a migration ID")
	}
	r, err := c.Cancel(ctx, args[0])
	if err != nil {
		return rpcErr(err)
	}
	fmt.Fprintln(stdout, r.Message)
	return nil
}

func cmdVersion(ctx context.Context, c *client.Client, stdout io.Writer) error {
	fmt.Fprintf(stdout, "migratectl %s\n", buildinfo.String())
	v, err := c.Version(ctx)
	if err != nil {
		return rpcErr(err)
	}
	fmt.Fprintf(stdout, "migrated   %s on %s\n", v.Version, v.Hostname)
	fmt.Fprintf(stdout, "criu       %s (page-server header %d bytes, soft-dirty %v, lazy pages %v)\n", v.CriuVersion, v.PageServerHeaderSize, v.SoftDirty, v.LazyPages)
	fmt.Fprintf(stdout, "peer API   %s\n", v.PeerTransport)
	for _, w := range v.Warnings {
		fmt.Fprintf(stdout, "WARNING: %s\n", w)
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
