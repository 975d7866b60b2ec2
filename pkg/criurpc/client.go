package criurpc

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// Client runs CRIU operations through `criu swrk`. The zero value is ready
// to use; New applies options. A Client holds no resources and is safe for
// concurrent use: every operation starts its own CRIU process.
type Client struct {
	// Path is the criu binary; "criu" (looked up on PATH) when empty.
	Path string
	// Logger receives debug logs; a null logger when nil.
	Logger hclog.Logger

	// skipMemTrackCheck lets tests send a pre-dump to CRIU without the
	// client's soft-dirty check, to see CRIU's own refusal.
	skipMemTrackCheck bool
}

// Option configures a Client made by New.
type Option func(*Client)

// WithPath sets the criu binary.
func WithPath(path string) Option { return func(c *Client) { c.Path = path } }

// WithLogger sets the logger.
func WithLogger(l hclog.Logger) Option { return func(c *Client) { c.Logger = l } }

// New returns a Client with the given options.
func New(opts ...Option) *Client {
	c := &Client{}
	for _, o := range opts {
		o(c)
	}
	return c
}

func (c *Client) path() string {
	if c.Path == "" {
		return "criu"
	}
	return c.Path
}

func (c *Client) logger() hclog.Logger {
	if c.Logger == nil {
		return hclog.NewNullLogger()
	}
	return c.Logger
}

// opInfo names an operation for error reports.
type opInfo struct {
	op      string
	pid     int
	logPath string
}

// failure builds the *Error of a failed operation from CRIU's answer (nil
// when there was none), the client-side cause and CRIU's log and stderr.
func (s *swrk) failure(op opInfo, resp *rpcpb.CriuResp, cause error) *Error {
	e := &Error{Op: op.op, PID: op.pid, Err: cause}
	if resp != nil {
		e.Errno = unix.Errno(resp.GetCrErrno())
		if m := cleanErrMsg(resp.GetCrErrmsg()); m != "" && !harmlessLogLine(m) {
			e.Msg = m
		}
	}
	sum := readLogSummary(op.logPath)
	e.LogTail = sum.tail
	if e.Msg == "" {
		e.Msg = sum.firstErr
	}
	if s != nil && s.proc != nil && (resp == nil || e.Msg == "") {
		// CRIU may be on its way out: its exit status and stderr
		// explain a crash.
		if resp == nil {
			s.conn.Close()
			s.wait(context.Background(), true)
		}
		if tail := s.proc.stderrTail(); len(tail) > 0 {
			if e.Msg == "" {
				e.Msg = tail[len(tail)-1]
			}
			if len(e.LogTail) == 0 {
				e.LogTail = tail
			}
		}
		if st := s.exitStatus(); st != "" && resp == nil && errors.Is(cause, ErrCRIUExited) {
			e.Err = fmt.Errorf("%w (%s)", cause, st)
		}
	}
	if e.Msg == "" && resp != nil && cause == nil {
		e.Msg = "criu reported failure without a message"
	}
	return e
}

// simple runs one request that needs no dirs on a fresh CRIU.
func (c *Client) simple(ctx context.Context, op string, req *rpcpb.CriuReq) (*rpcpb.CriuResp, error) {
	s, err := c.startSwrk(ctx, nil)
	if err != nil {
		return nil, &Error{Op: op, Err: err}
	}
	defer s.finish(ctx)
	res, err := s.call(ctx, req, req.GetType(), nil)
	if err != nil {
		return nil, s.failure(opInfo{op: op}, nil, err)
	}
	if !res.resp.GetSuccess() {
		return nil, s.failure(opInfo{op: op}, res.resp, nil)
	}
	return res.resp, nil
}

// Version asks CRIU for its version.
func (c *Client) Version(ctx context.Context) (Version, error) {
	resp, err := c.simple(ctx, "version", &rpcpb.CriuReq{Type: rpcpb.CriuReqType_VERSION.Enum()})
	if err != nil {
		return Version{}, err
	}
	return versionFrom(resp)
}

func versionFrom(resp *rpcpb.CriuResp) (Version, error) {
	v := resp.GetVersion()
	if v == nil {
		return Version{}, &Error{Op: "version", Err: fmt.Errorf("%w: version answer without a version", ErrProtocol)}
	}
	return Version{
		Major:    int(v.GetMajorNumber()),
		Minor:    int(v.GetMinorNumber()),
		Sublevel: int(v.GetSublevel()),
		Extra:    int(v.GetExtra()),
		GitID:    v.GetGitid(),
		Name:     v.GetName(),
	}, nil
}

// Check runs `criu check`: whether this kernel supports what CRIU needs for
// a basic dump and restore.
func (c *Client) Check(ctx context.Context) error {
	_, err := c.simple(ctx, "check", &rpcpb.CriuReq{Type: rpcpb.CriuReqType_CHECK.Enum()})
	return err
}

func featureRequest(keepOpen bool) *rpcpb.CriuReq {
	return &rpcpb.CriuReq{
		Type:     rpcpb.CriuReqType_FEATURE_CHECK.Enum(),
		KeepOpen: optBool(keepOpen),
		Features: &rpcpb.CriuFeatures{
			MemTrack:   proto.Bool(true),
			LazyPages:  proto.Bool(true),
			PidfdStore: proto.Bool(true),
		},
	}
}

func featuresFrom(op string, resp *rpcpb.CriuResp) (Features, error) {
	f := resp.GetFeatures()
	if f == nil {
		return Features{}, &Error{Op: op, Err: fmt.Errorf("%w: feature answer without features", ErrProtocol)}
	}
	return Features{MemTrack: f.GetMemTrack(), LazyPages: f.GetLazyPages(), PidfdStore: f.GetPidfdStore()}, nil
}

// FeatureCheck asks CRIU which optional features work on this kernel. The
// answers are CRIU's, read from its response.
func (c *Client) FeatureCheck(ctx context.Context) (Features, error) {
	resp, err := c.simple(ctx, "feature-check", featureRequest(false))
	if err != nil {
		return Features{}, err
	}
	return featuresFrom("feature-check", resp)
}

// Probe reports CRIU's version, page-server header size and features with
// one CRIU process.
func (c *Client) Probe(ctx context.Context) (Capabilities, error) {
	s, err := c.startSwrk(ctx, nil)
	if err != nil {
		return Capabilities{}, &Error{Op: "version", Err: err}
	}
	defer s.finish(ctx)
	vreq := &rpcpb.CriuReq{Type: rpcpb.CriuReqType_VERSION.Enum(), KeepOpen: proto.Bool(true)}
	res, err := s.call(ctx, vreq, rpcpb.CriuReqType_VERSION, nil)
	if err != nil {
		return Capabilities{}, s.failure(opInfo{op: "version"}, nil, err)
	}
	if !res.resp.GetSuccess() {
		return Capabilities{}, s.failure(opInfo{op: "version"}, res.resp, nil)
	}
	v, err := versionFrom(res.resp)
	if err != nil {
		return Capabilities{}, err
	}
	f, err := s.features(ctx, "feature-check", false)
	if err != nil {
		return Capabilities{}, err
	}
	return Capabilities{
		Version:              v,
		PageServerHeaderSize: v.PageServerHeaderSize(),
		Features:             f,
		SoftDirty:            f.MemTrack,
	}, nil
}

// features runs a feature check on an open session.
func (s *swrk) features(ctx context.Context, op string, keepOpen bool) (Features, error) {
	res, err := s.call(ctx, featureRequest(keepOpen), rpcpb.CriuReqType_FEATURE_CHECK, nil)
	if err != nil {
		return Features{}, s.failure(opInfo{op: op}, nil, err)
	}
	if !res.resp.GetSuccess() {
		return Features{}, s.failure(opInfo{op: op}, res.resp, nil)
	}
	return featuresFrom(op, res.resp)
}

// requireMemTrack fails with ErrNoMemTracking when the kernel cannot track
// memory changes, keeping the session open otherwise.
func (s *swrk) requireMemTrack(ctx context.Context, op string, pid int) error {
	f, err := s.features(ctx, op, true)
	if err != nil {
		return err
	}
	if !f.MemTrack {
		return &Error{Op: op, PID: pid, Err: ErrNoMemTracking}
	}
	return nil
}

// CPUInfoDump writes this host's CPU description to cpuinfo.img in
// ImagesDir, for CPUInfoCheck on another host.
func (c *Client) CPUInfoDump(ctx context.Context, o CPUInfoOptions) error {
	return c.cpuinfo(ctx, "cpuinfo-dump", rpcpb.CriuReqType_CPUINFO_DUMP, o)
}

// CPUInfoCheck checks that this host's CPU can run images made on the host
// whose cpuinfo.img is in ImagesDir.
func (c *Client) CPUInfoCheck(ctx context.Context, o CPUInfoOptions) error {
	return c.cpuinfo(ctx, "cpuinfo-check", rpcpb.CriuReqType_CPUINFO_CHECK, o)
}

func (c *Client) cpuinfo(ctx context.Context, op string, t rpcpb.CriuReqType, o CPUInfoOptions) error {
	var files reqFiles
	defer files.close()
	opts := &rpcpb.CriuOpts{}
	if err := files.openDirs(opts, o.ImagesDir, o.WorkDir, o.LogFile, op+".log", o.LogLevel); err != nil {
		return &Error{Op: op, Err: err}
	}
	s, err := c.startSwrk(ctx, nil)
	if err != nil {
		return &Error{Op: op, Err: err}
	}
	defer s.finish(ctx)
	info := opInfo{op: op, logPath: files.logPath}
	res, err := s.call(ctx, &rpcpb.CriuReq{Type: t.Enum(), Opts: opts}, t, nil)
	if err != nil {
		return s.failure(info, nil, err)
	}
	if !res.resp.GetSuccess() {
		return s.failure(info, res.resp, nil)
	}
	return nil
}

// result turns the outcome of a call into an error, nil on success.
func (s *swrk) result(info opInfo, res callResult, err error) error {
	if err != nil {
		return s.failure(info, nil, err)
	}
	if !res.resp.GetSuccess() {
		if res.notifyErr != nil {
			// CRIU's message only says that the client failed; the
			// handler's error says why.
			e := s.failure(info, res.resp, fmt.Errorf("%w: %w", ErrNotifyFailed, res.notifyErr))
			e.Msg = e.Err.Error()
			return e
		}
		return s.failure(info, res.resp, nil)
	}
	return nil
}

// Dump dumps the tree rooted at o.PID into o.ImagesDir (pages to
// o.PageServer when set), notifying n. Unless LeaveRunning or LeaveStopped
// is set, CRIU kills the tree after a successful dump. On failure the tree
// runs on. The stats are nil when CRIU wrote none that could be read.
func (c *Client) Dump(ctx context.Context, o DumpOptions, n Notifier) (*DumpStats, error) {
	var files reqFiles
	defer files.close()
	opts, err := dumpRequest(o, "dump.log", &files)
	if err != nil {
		return nil, &Error{Op: "dump", PID: o.PID, Err: err}
	}
	opts.NotifyScripts = optBool(n != nil)
	s, err := c.startSwrk(ctx, files.inherit)
	if err != nil {
		return nil, &Error{Op: "dump", PID: o.PID, Err: err}
	}
	defer s.finish(ctx)
	if o.TrackMem {
		if err := s.requireMemTrack(ctx, "dump", o.PID); err != nil {
			return nil, err
		}
	}
	info := opInfo{op: "dump", pid: o.PID, logPath: files.logPath}
	res, err := s.call(ctx, &rpcpb.CriuReq{Type: rpcpb.CriuReqType_DUMP.Enum(), Opts: opts}, rpcpb.CriuReqType_DUMP, n)
	if err := s.result(info, res, err); err != nil {
		return nil, err
	}
	return c.readStats(files.workDir, "dump"), nil
}

// RestoreResult is the outcome of a restore.
type RestoreResult struct {
	// PID is the restored root task, in the caller's PID namespace.
	PID int
	// Stats is nil when CRIU wrote no readable stats-restore.
	Stats *RestoreStats
}

// Restore restores the tree in o.ImagesDir, notifying n. See
// RestoreOptions.Sibling for who becomes the restored tree's parent.
func (c *Client) Restore(ctx context.Context, o RestoreOptions, n Notifier) (*RestoreResult, error) {
	var files reqFiles
	defer files.close()
	opts, err := restoreRequest(o, &files)
	if err != nil {
		return nil, &Error{Op: "restore", Err: err}
	}
	opts.NotifyScripts = optBool(n != nil)
	s, err := c.startSwrk(ctx, files.inherit)
	if err != nil {
		return nil, &Error{Op: "restore", Err: err}
	}
	defer s.finish(ctx)
	info := opInfo{op: "restore", logPath: files.logPath}
	res, err := s.call(ctx, &rpcpb.CriuReq{Type: rpcpb.CriuReqType_RESTORE.Enum(), Opts: opts}, rpcpb.CriuReqType_RESTORE, n)
	if err := s.result(info, res, err); err != nil {
		return nil, err
	}
	pid := int(res.resp.GetRestore().GetPid())
	if pid <= 0 {
		return nil, s.failure(info, nil, fmt.Errorf("%w: restore answer without a PID", ErrProtocol))
	}
	return &RestoreResult{PID: pid, Stats: c.restoreStats(files.workDir)}, nil
}

func (c *Client) readStats(dir, kind string) *DumpStats {
	st, err := ReadDumpStats(dir)
	if err != nil {
		c.logger().Warn("cannot read criu stats", "kind", kind, "error", err)
		return nil
	}
	return st
}

func (c *Client) restoreStats(dir string) *RestoreStats {
	st, err := ReadRestoreStats(dir)
	if err != nil {
		c.logger().Warn("cannot read criu stats", "kind", "restore", "error", err)
		return nil
	}
	return st
}
