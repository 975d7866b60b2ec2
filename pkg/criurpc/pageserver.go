package criurpc

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// PageServer is a `criu page-server` running as a child of a swrk CRIU,
// which stays to wait for it. Its owner must call Wait or Kill.
type PageServer struct {
	// PID of the page-server process.
	PID int
	// Port it listens on; 0 when it serves a passed connection.
	Port int

	s       *swrk
	logPath string

	mu   sync.Mutex
	done bool
	err  error
}

// StartPageServer starts a page server that writes the pages it receives to
// o.ImagesDir. It listens on o.Address:o.Port, or reads the stream from
// o.Conn. The page server exits when its stream ends with CLOSE or
// FORCE_CLOSE (or the connection breaks); it acknowledges CLOSE before it
// has flushed its files, so only Wait returning tells that the images are
// complete.
func (c *Client) StartPageServer(ctx context.Context, o PageServerOptions) (*PageServer, error) {
	var files reqFiles
	defer files.close()
	opts, err := pageServerRequest(o, &files)
	if err != nil {
		return nil, &Error{Op: "page-server", Err: err}
	}
	s, err := c.startSwrk(ctx, files.inherit)
	if err != nil {
		return nil, &Error{Op: "page-server", Err: err}
	}
	info := opInfo{op: "page-server", logPath: files.logPath}
	req := &rpcpb.CriuReq{
		Type:     rpcpb.CriuReqType_PAGE_SERVER_CHLD.Enum(),
		Opts:     opts,
		KeepOpen: proto.Bool(true),
	}
	// CRIU answers a PAGE_SERVER_CHLD request with type PAGE_SERVER.
	res, err := s.call(ctx, req, rpcpb.CriuReqType_PAGE_SERVER, nil)
	if err := s.result(info, res, err); err != nil {
		s.close(ctx)
		return nil, err
	}
	ps := res.resp.GetPs()
	if ps.GetPid() <= 0 {
		err := s.failure(info, nil, fmt.Errorf("%w: page-server answer without a PID", ErrProtocol))
		s.close(ctx)
		return nil, err
	}
	return &PageServer{PID: int(ps.GetPid()), Port: int(ps.GetPort()), s: s, logPath: files.logPath}, nil
}

// Wait waits until the page server exited and its images are flushed, and
// reports whether it succeeded. When ctx ends first, the page server is
// killed and ctx's error returned. Wait may be called again and returns the
// same result.
func (p *PageServer) Wait(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return p.err
	}
	p.done = true
	p.err = p.wait(ctx)
	return p.err
}

func (p *PageServer) wait(ctx context.Context) error {
	info := opInfo{op: "page-server", logPath: p.logPath}
	req := &rpcpb.CriuReq{Type: rpcpb.CriuReqType_WAIT_PID.Enum(), Pid: proto.Uint32(uint32(p.PID))}
	res, err := p.s.call(ctx, req, rpcpb.CriuReqType_WAIT_PID, nil)
	if err != nil {
		e := p.s.failure(info, nil, err)
		p.s.close(ctx)
		return e
	}
	defer p.s.finish(ctx)
	if !res.resp.GetSuccess() {
		return p.s.failure(opInfo{op: "wait-pid"}, res.resp, nil)
	}
	ws := unix.WaitStatus(res.resp.GetStatus())
	switch {
	case ws.Exited() && ws.ExitStatus() == 0:
		return nil
	case ws.Exited():
		return p.s.failure(info, nil, fmt.Errorf("page server exited with status %d", ws.ExitStatus()))
	case ws.Signaled():
		return p.s.failure(info, nil, fmt.Errorf("page server killed by %s", ws.Signal()))
	}
	return p.s.failure(info, nil, fmt.Errorf("page server ended with wait status %#x", uint32(ws)))
}

// Kill kills the page server, lets CRIU reap it, and ends the session. Its
// images are incomplete. It is a no-op after Wait.
func (p *PageServer) Kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return nil
	}
	p.done = true
	_ = unix.Kill(p.PID, unix.SIGKILL)
	p.err = p.wait(context.Background())
	return nil
}
