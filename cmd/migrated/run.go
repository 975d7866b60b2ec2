package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/agent"
	"github.com/migrated/migrated/internal/buildinfo"
	"github.com/migrated/migrated/internal/failpoint"
	"github.com/migrated/migrated/internal/host"
	"github.com/migrated/migrated/internal/metrics"
	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/phaul"
)

// maxControlMessage bounds a Control API request; they are small.
const maxControlMessage = 1 << 20

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
		Name: "migrated", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr, JSONFormat: cfg.LogJSON,
	})

	// The doors first: nothing starts when they cannot be locked.
	var serverTLS, clientTLS, controlTLS *tls.Config
	if cfg.Insecure {
		log.Warn("the peer API runs WITHOUT TLS (--insecure): anyone who reaches " + cfg.Listen + " can restore code on this host as root")
	} else {
		files := agent.TLSFiles{Cert: cfg.TLS.Cert, Key: cfg.TLS.Key, CA: cfg.TLS.CA}
		if serverTLS, clientTLS, err = agent.LoadTLS(files, cfg.TLS.PeerAllow); err != nil {
			return fmt.Errorf("config keys tls.cert, tls.key, tls.ca: %w", err)
		}
		if cfg.Control.Listen != "" {
			if controlTLS, _, err = agent.LoadTLS(files, nil); err != nil {
				return fmt.Errorf("config keys tls.cert, tls.key, tls.ca: %w", err)
			}
		}
	}
	gid, err := lookupGroup(cfg.SocketGroup)
	if err != nil {
		return err
	}

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return err
	}
	// The socket's directory must let the socket group reach the socket;
	// the socket itself is 0660.
	if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o755); err != nil {
		return err
	}
	journal, err := phaul.OpenJournal(filepath.Join(cfg.StateDir, "journal"))
	if err != nil {
		return err
	}
	criu := criurpc.New(criurpc.WithPath(cfg.CRIU), criurpc.WithLogger(log.Named("criu")))
	src := host.NewSource(criu, cfg.WorkDir, log.Named("host"))
	dst := host.NewDest(criu, cfg.WorkDir, log.Named("host"))
	dst.StoreBudget = int64(cfg.Limits.StoreBudget)

	fps, err := failpoint.Parse(cfg.failpoints, log.Named("failpoint"))
	if err != nil {
		return err
	}
	var hooks phaul.Hooks
	if fps != nil {
		hooks = fps
		log.Warn("failpoints enabled: this agent injects faults", "failpoints", cfg.failpoints)
	}
	var mx *metrics.Metrics
	var observe func(phaul.Event)
	if cfg.MetricsListen != "" {
		mx = metrics.New()
		observe = mx.Observe
	}
	dialer := agent.PeerDialer{TLS: clientTLS}
	source := phaul.NewSource(phaul.SourceConfig{
		Local: src, Dial: dialer.Dial, Journal: journal, Logger: log.Named("phaul"), Hooks: hooks, Observe: observe,
	})
	dest := phaul.NewDestination(phaul.DestConfig{
		Local: dst, Journal: journal, Logger: log.Named("phaul"), Hooks: hooks,
		MaxConcurrent: cfg.Limits.MaxConcurrent, MaxImageBytes: int64(cfg.Limits.MaxImages),
	})

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
	owned := func(id string) bool {
		r, err := journal.Get(id)
		return err == nil && !r.Terminal()
	}
	for _, o := range host.Orphans(cfg.WorkDir, "/proc", owned) {
		log.Warn("orphaned state, left in place for the operator: " + o)
	}

	// Peer API.
	peerCreds := insecure.NewCredentials()
	if serverTLS != nil {
		var refused func()
		if mx != nil {
			refused = mx.PeerRefused
		}
		peerCreds = agent.ServerCredentials(serverTLS, log.Named("peer"), refused)
	}
	guard := &agent.PeerGuard{
		MaxPerPeer: cfg.Limits.MaxPerPeer, Log: log.Named("peer"),
		State: func(id string) string { return dest.Status(id).State },
		JournaledOwner: func(id string) string {
			if r, err := journal.Get(id); err == nil && r.Role == "destination" {
				return r.Peer
			}
			return ""
		},
	}
	peerLn, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("peer API (config key listen): %w", err)
	}
	peerSrv := grpc.NewServer(
		grpc.Creds(peerCreds),
		grpc.MaxRecvMsgSize(int(cfg.Limits.MaxMessage)),
		grpc.ConnectionTimeout(10*time.Second),
		grpc.ChainUnaryInterceptor(guard.Unary()),
		grpc.ChainStreamInterceptor(guard.Stream()),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 5 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 2 * time.Second, PermitWithoutStream: true}),
	)
	migratev1.RegisterPeerServer(peerSrv, &agent.PeerServer{Dest: dest, Log: log.Named("peer")})
	healthSrv := health.NewServer()
	healthpb.RegisterHealthServer(peerSrv, healthSrv)

	// Control API: the unix socket, and remote control over mutual TLS.
	auth := &agent.ControlAuth{
		Group: gid, GroupName: cfg.SocketGroup, GroupMayMove: cfg.GroupMayMove,
		RemoteAllow: cfg.Control.Allow, Log: log.Named("control"),
	}
	if mx != nil {
		auth.Denied = mx.ControlDenied
	}
	closers := []io.Closer{peerLn}
	closeAll := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i].Close()
		}
	}
	_ = os.Remove(cfg.Socket)
	ctlLn, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		closeAll()
		return fmt.Errorf("control socket (config key socket): %w", err)
	}
	closers = append(closers, ctlLn)
	if gid >= 0 {
		if err := os.Chown(cfg.Socket, -1, gid); err != nil {
			closeAll()
			return fmt.Errorf("control socket group (config key socket_group): %w", err)
		}
	}
	if err := os.Chmod(cfg.Socket, 0o660); err != nil {
		closeAll()
		return err
	}
	if st, err := os.Stat(filepath.Dir(cfg.Socket)); gid >= 0 && err == nil && st.Mode().Perm()&0o011 == 0 {
		log.Warn("members of the socket group cannot reach the control socket: its directory is closed to them",
			"directory", filepath.Dir(cfg.Socket), "mode", st.Mode().Perm().String())
	}
	controlServer := &agent.ControlServer{
		Source: source, Dest: dest, Journal: journal, Local: src, Log: log.Named("control"), Insecure: cfg.Insecure,
	}
	newControl := func(creds credentials.TransportCredentials) *grpc.Server {
		s := grpc.NewServer(
			grpc.Creds(creds),
			grpc.MaxRecvMsgSize(maxControlMessage),
			grpc.ChainUnaryInterceptor(auth.Unary()),
			grpc.ChainStreamInterceptor(auth.Stream()),
		)
		migratev1.RegisterControlServer(s, controlServer)
		return s
	}
	ctlSrv := newControl(agent.UnixCredentials())
	var remoteSrv *grpc.Server
	var remoteLn net.Listener
	if cfg.Control.Listen != "" {
		if remoteLn, err = net.Listen("tcp", cfg.Control.Listen); err != nil {
			closeAll()
			return fmt.Errorf("remote control (config key control.listen): %w", err)
		}
		closers = append(closers, remoteLn)
		remoteSrv = newControl(agent.ServerCredentials(controlTLS, log.Named("control"), nil))
	}
	var metricsSrv *http.Server
	var metricsLn net.Listener
	if mx != nil {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			closeAll()
			return fmt.Errorf("metrics (config key metrics_listen): %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", mx.Handler())
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	}

	errc := make(chan error, 4)
	serving := 2
	go func() { errc <- peerSrv.Serve(peerLn) }()
	go func() { errc <- ctlSrv.Serve(ctlLn) }()
	if remoteSrv != nil {
		serving++
		go func() { errc <- remoteSrv.Serve(remoteLn) }()
	}
	if metricsSrv != nil {
		serving++
		go func() { errc <- metricsSrv.Serve(metricsLn) }()
	}
	transport := "mtls"
	if cfg.Insecure {
		transport = "insecure"
	}
	kv := []any{"version", buildinfo.String(), "socket", cfg.Socket, "listen", peerLn.Addr().String(),
		"peer_transport", transport, "state_dir", cfg.StateDir}
	if len(cfg.TLS.PeerAllow) > 0 {
		kv = append(kv, "peer_allow", strings.Join(cfg.TLS.PeerAllow, ","))
	}
	if remoteLn != nil {
		kv = append(kv, "control_listen", remoteLn.Addr().String())
	}
	if metricsLn != nil {
		kv = append(kv, "metrics_listen", metricsLn.Addr().String())
	}
	log.Info("migrated started", kv...)
	notify("READY=1")

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
		serving--
	}
	notify("STOPPING=1")
	log.Info("shutting down: migrations before their commit point are cancelled and their processes resumed here")
	healthSrv.Shutdown()
	source.Close()
	if remoteSrv != nil {
		stopGracefully(remoteSrv, 5*time.Second)
	}
	stopGracefully(ctlSrv, 5*time.Second)
	stopGracefully(peerSrv, 10*time.Second)
	dest.Close()
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
	}
	for ; serving > 0; serving-- {
		<-errc
	}
	_ = os.Remove(cfg.Socket)
	log.Info("stopped")
	if serveErr != nil && !errors.Is(serveErr, grpc.ErrServerStopped) && !errors.Is(serveErr, http.ErrServerClosed) {
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
