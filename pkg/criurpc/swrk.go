package criurpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

const (
	// maxMessage bounds one datagram from CRIU. CRIU's answers are a few
	// hundred bytes; anything that does not fit is garbage.
	maxMessage = 64 << 10
	// maxPassedFDs is how many fds one datagram from CRIU may carry.
	maxPassedFDs = 8
	// exitGrace is how long a CRIU process that was told to go away
	// (its socket closed, or its last answer sent) may take to exit
	// before it is killed.
	exitGrace = 10 * time.Second
	// stderrKeep is how much of CRIU's stderr an error report keeps.
	stderrKeep = 4 << 10
	// swrkFD is the fd number of the RPC socket in CRIU's process; files
	// passed to CRIU follow it.
	swrkFD = 3
)

// conn is the client's end of a swrk socket. It is an interface so that the
// message handling can be tested against a fake CRIU on a socketpair.
type conn interface {
	ReadMsgUnix(b, oob []byte) (n, oobn, flags int, addr *net.UnixAddr, err error)
	Write(b []byte) (int, error)
	SetDeadline(t time.Time) error
	Close() error
}

// swrk is one `criu swrk` process and its socket. Its owner must call close
// (or finish after CRIU's final answer), which always reaps the process.
type swrk struct {
	log  hclog.Logger
	conn conn
	buf  []byte
	oob  []byte

	// proc is nil for a fake peer in tests.
	proc *swrkProc
}

// swrkProc is the CRIU process behind a swrk session.
type swrkProc struct {
	cmd    *exec.Cmd
	pid    int
	stderr *os.File // memfd holding CRIU's stderr

	mu   sync.Mutex
	dead bool // exited (possibly not yet reaped): no more signals

	exited  chan struct{} // closed once reaped
	waitErr error
}

// startSwrk starts `criu swrk 3` with files passed as fds 4, 5, … in the
// CRIU process. CRIU runs in its own process group so that aborting kills
// CRIU and every helper it forked.
func (c *Client) startSwrk(ctx context.Context, files []*os.File) (*swrk, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("swrk socketpair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "criu-swrk")
	theirs := os.NewFile(uintptr(fds[1]), "criu-swrk-peer")
	defer theirs.Close()
	nc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("swrk socket: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("swrk socket: unexpected type %T", nc)
	}

	cmd := exec.Command(c.path(), "swrk", strconv.Itoa(swrkFD))
	cmd.ExtraFiles = append([]*os.File{theirs}, files...)
	p, err := startProc(cmd)
	if err != nil {
		uc.Close()
		return nil, err
	}
	s := &swrk{
		log:  c.logger().With("criu_pid", p.pid),
		conn: uc,
		buf:  make([]byte, maxMessage),
		oob:  make([]byte, unix.CmsgSpace(maxPassedFDs*4)),
		proc: p,
	}
	s.log.Trace("criu swrk started")
	return s, nil
}

// startProc starts cmd in its own process group with its stderr kept in a
// memfd, and reaps it in the background.
func startProc(cmd *exec.Cmd) (*swrkProc, error) {
	memfd, err := unix.MemfdCreate("criu-stderr", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("criu stderr memfd: %w", err)
	}
	stderr := os.NewFile(uintptr(memfd), "criu-stderr")
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		stderr.Close()
		return nil, fmt.Errorf("start %s: %w", strings.Join(cmd.Args, " "), err)
	}
	p := &swrkProc{cmd: cmd, pid: cmd.Process.Pid, stderr: stderr, exited: make(chan struct{})}
	go p.reap()
	return p, nil
}

// reap waits for the process. It first waits without reaping so that a
// concurrent kill of the process group never hits a reused PID.
func (p *swrkProc) reap() {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, p.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	p.mu.Lock()
	p.dead = true
	p.mu.Unlock()
	p.waitErr = p.cmd.Wait()
	close(p.exited)
}

// kill sends SIGKILL to CRIU and, with group, to its whole process group.
func (p *swrkProc) kill(group bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead {
		return
	}
	if group {
		_ = unix.Kill(-p.pid, unix.SIGKILL)
	}
	_ = unix.Kill(p.pid, unix.SIGKILL)
}

// stderrTail returns the last lines CRIU wrote to stderr.
func (p *swrkProc) stderrTail() []string {
	fi, err := p.stderr.Stat()
	if err != nil || fi.Size() == 0 {
		return nil
	}
	off := fi.Size() - stderrKeep
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	n, _ := p.stderr.ReadAt(b, off)
	var lines []string
	for _, l := range strings.Split(string(b[:n]), "\n") {
		if l = strings.TrimSpace(l); l != "" && !harmlessLogLine(l) {
			lines = append(lines, l)
		}
	}
	return lines
}

// pid returns CRIU's PID, 0 for a fake peer.
func (s *swrk) pid() int {
	if s.proc == nil {
		return 0
	}
	return s.proc.pid
}

// abort kills CRIU and its helpers and unblocks any read.
func (s *swrk) abort() {
	if s.proc != nil {
		s.proc.kill(true)
	}
	_ = s.conn.SetDeadline(time.Now())
}

// close ends the session: it closes the socket, which makes an idle CRIU
// exit, and reaps CRIU, killing its process group when it does not exit
// within exitGrace or ctx ends first.
func (s *swrk) close(ctx context.Context) {
	s.conn.Close()
	s.wait(ctx, true)
	s.release()
}

// finish reaps CRIU after its final answer. CRIU exits by itself then; only
// CRIU itself is killed if it does not, never its process group, which may
// hold restored shell-job tasks.
func (s *swrk) finish(ctx context.Context) {
	s.conn.Close()
	s.wait(ctx, false)
	s.release()
}

// release frees what the session keeps after CRIU exited.
func (s *swrk) release() {
	if s.proc != nil {
		s.proc.stderr.Close()
	}
}

func (s *swrk) wait(ctx context.Context, group bool) {
	p := s.proc
	if p == nil {
		return
	}
	t := time.NewTimer(exitGrace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-ctx.Done():
		p.kill(group)
		<-p.exited
	case <-t.C:
		s.log.Warn("criu did not exit, killing it")
		p.kill(group)
		<-p.exited
	}
	if p.waitErr != nil {
		s.log.Trace("criu swrk exited", "status", p.waitErr)
	}
}

// exitStatus describes how CRIU ended, once it has.
func (s *swrk) exitStatus() string {
	if s.proc == nil {
		return ""
	}
	select {
	case <-s.proc.exited:
		if s.proc.waitErr == nil {
			return "exit status 0"
		}
		return s.proc.waitErr.Error()
	default:
		return ""
	}
}

// send writes one request datagram.
func (s *swrk) send(req *rpcpb.CriuReq) error {
	b, err := proto.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode %s request: %w", req.GetType(), err)
	}
	if _, err := s.conn.Write(b); err != nil {
		return fmt.Errorf("send %s request: %w: %w", req.GetType(), ErrCRIUExited, err)
	}
	return nil
}

// recv reads one answer datagram and the fds passed with it.
func (s *swrk) recv() (*rpcpb.CriuResp, []*os.File, error) {
	n, oobn, flags, _, err := s.conn.ReadMsgUnix(s.buf, s.oob)
	var files []*os.File
	if oobn > 0 {
		files = parseRights(s.oob[:oobn])
	}
	if err != nil {
		closeAll(files)
		if errors.Is(err, io.EOF) {
			return nil, nil, ErrCRIUExited
		}
		return nil, nil, fmt.Errorf("%w: %w", ErrCRIUExited, err)
	}
	if n == 0 {
		closeAll(files)
		return nil, nil, ErrCRIUExited
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll(files)
		return nil, nil, fmt.Errorf("%w: message truncated (flags %#x)", ErrProtocol, flags)
	}
	resp, err := decodeResponse(s.buf[:n])
	if err != nil {
		closeAll(files)
		return nil, nil, err
	}
	return resp, files, nil
}

// decodeResponse decodes and sanity-checks one criu_resp datagram.
func decodeResponse(b []byte) (*rpcpb.CriuResp, error) {
	resp := new(rpcpb.CriuResp)
	if err := proto.Unmarshal(b, resp); err != nil {
		return nil, fmt.Errorf("%w: undecodable response: %w", ErrProtocol, err)
	}
	if resp.GetType() == rpcpb.CriuReqType_NOTIFY && resp.GetNotify() == nil {
		return nil, fmt.Errorf("%w: notification without a stage", ErrProtocol)
	}
	return resp, nil
}

// parseRights returns the fds of SCM_RIGHTS messages in oob.
func parseRights(oob []byte) []*os.File {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var files []*os.File
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "criu-passed-fd"))
		}
	}
	return files
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// callResult is the outcome of one request.
type callResult struct {
	resp *rpcpb.CriuResp
	// notifyErr is the first error a Notifier returned.
	notifyErr error
}

// call sends req and reads answers until CRIU's answer of type want,
// answering notifications with n (success when n is nil). A context that
// ends kills CRIU. The error is a client-side failure (ErrCRIUExited,
// ErrProtocol, a context error); CRIU's own failure is a response with
// Success false.
func (s *swrk) call(ctx context.Context, req *rpcpb.CriuReq, want rpcpb.CriuReqType, n Notifier) (callResult, error) {
	var res callResult
	stop := context.AfterFunc(ctx, s.abort)
	defer stop()
	ctxErr := func(err error) error {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		return err
	}
	if err := s.send(req); err != nil {
		s.abort()
		return res, ctxErr(err)
	}
	for {
		resp, files, err := s.recv()
		if err != nil {
			// CRIU is gone, or talks nonsense: make sure it is gone.
			s.abort()
			return res, ctxErr(err)
		}
		switch t := resp.GetType(); {
		case t == rpcpb.CriuReqType_NOTIFY:
			nerr := s.notify(ctx, resp.GetNotify(), files, n)
			if nerr != nil && res.notifyErr == nil {
				res.notifyErr = nerr
			}
			answer := &rpcpb.CriuReq{
				Type:          rpcpb.CriuReqType_NOTIFY.Enum(),
				NotifySuccess: proto.Bool(nerr == nil),
			}
			if err := s.send(answer); err != nil {
				s.abort()
				return res, ctxErr(err)
			}
		case t == want, t == rpcpb.CriuReqType_EMPTY && !resp.GetSuccess():
			closeAll(files)
			res.resp = resp
			return res, nil
		default:
			closeAll(files)
			s.abort()
			return res, fmt.Errorf("%w: got a %s answer to a %s request", ErrProtocol, t, req.GetType())
		}
	}
}

// notify hands one notification to n.
func (s *swrk) notify(ctx context.Context, cn *rpcpb.CriuNotify, files []*os.File, n Notifier) error {
	ev := Notification{Stage: Stage(cn.GetScript()), PID: int(cn.GetPid()), CRIUPID: s.pid()}
	if ev.Stage == StageOrphanPtsMaster && len(files) > 0 {
		ev.File = files[0]
		files = files[1:]
	}
	closeAll(files)
	s.log.Debug("criu notification", "stage", ev.Stage, "pid", ev.PID)
	if n == nil {
		if ev.File != nil {
			ev.File.Close()
		}
		return nil
	}
	err := n.Notify(ctx, ev)
	if err != nil {
		s.log.Debug("notification handler failed", "stage", ev.Stage, "error", err)
		if ev.File != nil {
			ev.File.Close()
		}
		return fmt.Errorf("%s: %w", ev.Stage, err)
	}
	return nil
}
