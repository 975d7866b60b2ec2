package criurpc

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// PreDumpSession is one CRIU process that ran a pre-dump and accepts more
// pre-dumps and one final dump, as CRIU requires: after a PRE_DUMP request
// the same swrk accepts only PRE_DUMP or DUMP. The session's owner must call
// Close; Dump ends the session by itself.
//
// Files CRIU inherits (a PageServer.Conn) are passed when the session
// starts: later requests may use only the files the first request passed.
// Every request writes its own OPEN…FORCE_CLOSE sequence on such a
// connection.
type PreDumpSession struct {
	c   *Client
	s   *swrk
	n   Notifier
	pid int
	// inherited maps files passed at start to their fd in CRIU.
	inherited map[*os.File]int32

	mu     sync.Mutex
	closed bool
	stats  *DumpStats
}

// PreDump starts a session and runs its first pre-dump: the tree's memory
// goes to o.ImagesDir (or o.PageServer) while it keeps running, and CRIU
// starts tracking changed pages. It needs soft-dirty tracking and fails with
// ErrNoMemTracking, without touching the tree, when the kernel has none.
func (c *Client) PreDump(ctx context.Context, o DumpOptions, n Notifier) (*PreDumpSession, error) {
	o.TrackMem = true
	var files reqFiles
	defer files.close()
	opts, err := dumpRequest(o, "pre-dump.log", &files)
	if err != nil {
		return nil, &Error{Op: "pre-dump", PID: o.PID, Err: err}
	}
	opts.NotifyScripts = optBool(n != nil)
	s, err := c.startSwrk(ctx, files.inherit)
	if err != nil {
		return nil, &Error{Op: "pre-dump", PID: o.PID, Err: err}
	}
	p := &PreDumpSession{c: c, s: s, n: n, pid: o.PID, inherited: map[*os.File]int32{}}
	for i, f := range files.inherit {
		p.inherited[f] = int32(swrkFD + 1 + i)
	}
	if !c.skipMemTrackCheck {
		if err := s.requireMemTrack(ctx, "pre-dump", o.PID); err != nil {
			s.close(ctx)
			return nil, err
		}
	}
	if err := p.run(ctx, rpcpb.CriuReqType_PRE_DUMP, opts, &files, n); err != nil {
		s.close(ctx)
		return nil, err
	}
	return p, nil
}

// PreDump runs another pre-dump on the session; o.ParentImage should name
// the previous round's images.
func (p *PreDumpSession) PreDump(ctx context.Context, o DumpOptions) error {
	return p.next(ctx, rpcpb.CriuReqType_PRE_DUMP, o, p.n)
}

// Dump runs the final dump on the session and closes it.
func (p *PreDumpSession) Dump(ctx context.Context, o DumpOptions, n Notifier) (*DumpStats, error) {
	err := p.next(ctx, rpcpb.CriuReqType_DUMP, o, n)
	p.Close()
	if err != nil {
		return nil, err
	}
	return p.Stats(), nil
}

// Stats returns the statistics of the last request, nil when unreadable.
func (p *PreDumpSession) Stats() *DumpStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Close ends the session and reaps CRIU. The tree is not touched.
func (p *PreDumpSession) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	p.s.close(context.Background())
	return nil
}

func (p *PreDumpSession) next(ctx context.Context, t rpcpb.CriuReqType, o DumpOptions, n Notifier) error {
	op := "pre-dump"
	defLog := "pre-dump.log"
	if t == rpcpb.CriuReqType_DUMP {
		op, defLog = "dump", "dump.log"
	} else {
		o.TrackMem = true
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return &Error{Op: op, PID: o.PID, Err: ErrSessionClosed}
	}
	if o.PID == 0 {
		o.PID = p.pid
	}
	var files reqFiles
	defer files.close()
	opts, err := dumpRequest(o, defLog, &files)
	if err != nil {
		return &Error{Op: op, PID: o.PID, Err: err}
	}
	if ps := opts.GetPs(); ps != nil && ps.Fd != nil {
		fd, ok := p.inherited[o.PageServer.Conn]
		if !ok {
			return &Error{Op: op, PID: o.PID, Err: fmt.Errorf("%w: page-server connection was not passed when the session started", ErrInvalidOptions)}
		}
		ps.Fd = &fd
	}
	opts.NotifyScripts = optBool(n != nil)
	err = p.run(ctx, t, opts, &files, n)
	if err != nil {
		// CRIU leaves the session after a failed request.
		p.Close()
	}
	return err
}

func (p *PreDumpSession) run(ctx context.Context, t rpcpb.CriuReqType, opts *rpcpb.CriuOpts, files *reqFiles, n Notifier) error {
	op := "pre-dump"
	if t == rpcpb.CriuReqType_DUMP {
		op = "dump"
	}
	info := opInfo{op: op, pid: int(opts.GetPid()), logPath: files.logPath}
	res, err := p.s.call(ctx, &rpcpb.CriuReq{Type: t.Enum(), Opts: opts}, t, n)
	if err := p.s.result(info, res, err); err != nil {
		return err
	}
	st := p.c.readStats(files.workDir, op)
	p.mu.Lock()
	p.stats = st
	p.mu.Unlock()
	return nil
}
