package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/agent"
	"github.com/migrated/migrated/internal/buildinfo"
	"github.com/migrated/migrated/internal/failpoint"
	"github.com/migrated/migrated/internal/host"
	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/phaul"
)

type config struct {
	socket   string
	listen   string
	stateDir string
	workDir  string
	criu     string
	insecure bool
	logJSON  bool
	logLevel string
	version  bool
	failpts  string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("migrated", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.socket, "socket", "/run/migrated/migrated.sock", "Control API unix socket")
	fs.StringVar(&c.listen, "listen", ":"+agent.DefaultPeerPort, "Peer API listen address")
	fs.StringVar(&c.stateDir, "state-dir", "/var/lib/migrated", "journal and state directory")
	fs.StringVar(&c.workDir, "work-dir", "", "migration work directories (default: /run/migrated/work on tmpfs when /run is tmpfs, else STATE-DIR/work)")
	fs.StringVar(&c.criu, "criu", "criu", "path of the criu binary")
	fs.BoolVar(&c.insecure, "insecure", false, "serve the Peer API over plain TCP (tests and trusted labs only)")
	fs.BoolVar(&c.logJSON, "log-json", false, "log JSON lines")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	fs.StringVar(&c.failpts, "failpoints", os.Getenv(failpoint.EnvVar), "fault injection for tests (see package failpoint); empty in production")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if c.workDir == "" {
		c.workDir = filepath.Join(c.stateDir, "work")
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if cfg.version {
		fmt.Fprintf(stdout, "migrated %s\n", buildinfo.String())
		return nil
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name: "migrated", Level: hclog.LevelFromString(cfg.logLevel), Output: stderr, JSONFormat: cfg.logJSON,
	})
	if !cfg.insecure {
		return errors.New("the Peer API needs TLS configuration (--tls-cert, --tls-key, --tls-ca); pass --insecure to serve it over plain TCP on a trusted network")
	}
	log.Warn("the peer API runs WITHOUT TLS (--insecure): anyone who reaches " + cfg.listen + " can restore code on this host as root")

	for _, d := range []string{cfg.stateDir, cfg.workDir, filepath.Dir(cfg.socket)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	journal, err := phaul.OpenJournal(filepath.Join(cfg.stateDir, "journal"))
	if err != nil {
		return err
	}
	criu := criurpc.New(criurpc.WithPath(cfg.criu), criurpc.WithLogger(log.Named("criu")))
	src := host.NewSource(criu, cfg.workDir, log.Named("host"))
	dst := host.NewDest(criu, cfg.workDir, log.Named("host"))

	fps, err := failpoint.Parse(cfg.failpts, log.Named("failpoint"))
	if err != nil {
		return err
	}
	var hooks phaul.Hooks
	if fps != nil {
		hooks = fps
		log.Warn("failpoints enabled: this agent injects faults", "failpoints", cfg.failpts)
	}
	dialer := agent.PeerDialer{}
	source := phaul.NewSource(phaul.SourceConfig{
		Local: src, Dial: dialer.Dial, Journal: journal, Logger: log.Named("phaul"), Hooks: hooks,
	})
	dest := phaul.NewDestination(phaul.DestConfig{Local: dst, Journal: journal, Logger: log.Named("phaul"), Hooks: hooks})

	// Recovery: the destination side first, so that decisions this agent
	// re-sends to itself (a host migrating to itself) find their records.
	if kept, notes := dest.Recover(); len(notes) > 0 {
		for _, n := range notes {
			log.Warn("recovery: " + n)
		}
		log.Info("recovery: destination side", "kept", len(kept))
	}
	if recs := source.Recover(); len(recs) > 0 {
		log.Info("recovery: driving unfinished migrations to an end", "count", len(recs))
	}

	peerLn, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("peer API: %w", err)
	}
	peerSrv := grpc.NewServer(
		grpc.MaxRecvMsgSize(16<<20),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 5 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 2 * time.Second, PermitWithoutStream: true}),
	)
	migratev1.RegisterPeerServer(peerSrv, &agent.PeerServer{Dest: dest, Log: log.Named("peer")})

	_ = os.Remove(cfg.socket)
	ctlLn, err := net.Listen("unix", cfg.socket)
	if err != nil {
		peerLn.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(cfg.socket, 0o660); err != nil {
		peerLn.Close()
		ctlLn.Close()
		return err
	}
	ctlSrv := grpc.NewServer()
	migratev1.RegisterControlServer(ctlSrv, &agent.ControlServer{
		Source: source, Dest: dest, Journal: journal, Local: src, Log: log.Named("control"), Insecure: cfg.insecure,
	})

	errc := make(chan error, 2)
	go func() { errc <- peerSrv.Serve(peerLn) }()
	go func() { errc <- ctlSrv.Serve(ctlLn) }()
	log.Info("migrated started", "version", buildinfo.String(), "socket", cfg.socket, "listen", peerLn.Addr().String(), "state_dir", cfg.stateDir)
	notify("READY=1")

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	notify("STOPPING=1")
	log.Info("shutting down: migrations before their commit point are cancelled and their processes resumed here")
	source.Close()
	stopGracefully(ctlSrv, 5*time.Second)
	stopGracefully(peerSrv, 10*time.Second)
	dest.Close()
	_ = os.Remove(cfg.socket)
	log.Info("stopped")
	if serveErr != nil && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return serveErr
	}
	return nil
}

// stopGracefully lets in-flight calls finish for up to d, then cuts them.
func stopGracefully(s *grpc.Server, d time.Duration) {
	stopped := make(chan struct{})
	go func() { s.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(d):
		s.Stop()
		<-stopped
	}
}
