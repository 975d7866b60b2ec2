package criurpc

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// fakeCRIU is the CRIU end of a swrk socket, driven by a test.
type fakeCRIU struct {
	t  *testing.T
	fd int
}

// newFakeSession returns a client-side session whose peer is a fake CRIU.
func newFakeSession(t *testing.T) (*swrk, *fakeCRIU) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "client")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	s := &swrk{
		log:  (&Client{}).logger(),
		conn: nc.(*net.UnixConn),
		buf:  make([]byte, maxMessage),
		oob:  make([]byte, unix.CmsgSpace(maxPassedFDs*4)),
	}
	peer := &fakeCRIU{t: t, fd: fds[1]}
	t.Cleanup(func() {
		s.conn.Close()
		peer.close()
	})
	return s, peer
}

func (p *fakeCRIU) close() {
	if p.fd >= 0 {
		unix.Close(p.fd)
		p.fd = -1
	}
}

// recv reads one request; it returns nil when the client went away.
func (p *fakeCRIU) recv() *rpcpb.CriuReq {
	buf := make([]byte, 4096)
	n, _, _, _, err := unix.Recvmsg(p.fd, buf, nil, 0)
	if err != nil || n == 0 {
		return nil
	}
	req := new(rpcpb.CriuReq)
	if err := proto.Unmarshal(buf[:n], req); err != nil {
		p.t.Errorf("fake criu: bad request: %v", err)
		return nil
	}
	return req
}

func (p *fakeCRIU) sendRaw(b []byte, fds ...int) {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(p.fd, b, oob, nil, 0); err != nil {
		p.t.Errorf("fake criu: send: %v", err)
	}
}

func (p *fakeCRIU) send(resp *rpcpb.CriuResp, fds ...int) {
	b, err := proto.Marshal(resp)
	if err != nil {
		p.t.Errorf("fake criu: marshal: %v", err)
		return
	}
	p.sendRaw(b, fds...)
}

func notifyResp(stage string, pid int32) *rpcpb.CriuResp {
	n := &rpcpb.CriuNotify{Script: proto.String(stage)}
	if pid != 0 {
		n.Pid = proto.Int32(pid)
	}
	return &rpcpb.CriuResp{Type: rpcpb.CriuReqType_NOTIFY.Enum(), Success: proto.Bool(true), Notify: n}
}

func dumpResp(ok bool) *rpcpb.CriuResp {
	return &rpcpb.CriuResp{Type: rpcpb.CriuReqType_DUMP.Enum(), Success: proto.Bool(ok)}
}

var dumpReq = &rpcpb.CriuReq{Type: rpcpb.CriuReqType_DUMP.Enum(), Opts: &rpcpb.CriuOpts{ImagesDirFd: proto.Int32(-1)}}

// runPeer plays CRIU in a goroutine and returns a channel closed when it
// is done; the test waits for it.
func runPeer(p *fakeCRIU, play func(p *fakeCRIU)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		play(p)
	}()
	return done
}

func TestCallNotificationsAndAnswers(t *testing.T) {
	s, peer := newFakeSession(t)
	var answers []bool
	done := runPeer(peer, func(p *fakeCRIU) {
		if req := p.recv(); req.GetType() != rpcpb.CriuReqType_DUMP {
			t.Errorf("fake criu got %v, want DUMP", req.GetType())
			return
		}
		for _, st := range []string{"pre-dump", "network-lock", "post-dump", "network-unlock"} {
			p.send(notifyResp(st, 0))
			a := p.recv()
			if a.GetType() != rpcpb.CriuReqType_NOTIFY {
				t.Errorf("answer to %s has type %v", st, a.GetType())
			}
			answers = append(answers, a.GetNotifySuccess())
		}
		p.send(dumpResp(true))
	})
	var stages []Stage
	n := NotifyFunc(func(ctx context.Context, n Notification) error {
		stages = append(stages, n.Stage)
		return nil
	})
	res, err := s.call(context.Background(), dumpReq, rpcpb.CriuReqType_DUMP, n)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if !res.resp.GetSuccess() || res.notifyErr != nil {
		t.Fatalf("result %+v", res)
	}
	want := []Stage{StagePreDump, StageNetworkLock, StagePostDump, StageNetworkUnlock}
	if strings.Join(stagesStr(stages), ",") != strings.Join(stagesStr(want), ",") {
		t.Fatalf("stages %v, want %v", stages, want)
	}
	for i, a := range answers {
		if !a {
			t.Fatalf("answer %d was failure", i)
		}
	}
}

func stagesStr(s []Stage) []string {
	var out []string
	for _, x := range s {
		out = append(out, string(x))
	}
	return out
}

func TestCallPostDumpFailure(t *testing.T) {
	s, peer := newFakeSession(t)
	var answer *rpcpb.CriuReq
	done := runPeer(peer, func(p *fakeCRIU) {
		p.recv()
		p.send(notifyResp("post-dump", 0))
		answer = p.recv()
		// CRIU resumes the tree and fails the dump.
		p.send(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_DUMP.Enum(), Success: proto.Bool(false),
			CrErrmsg: proto.String("(00.05) Error (criu/action-scripts.c:1): RPC client reported script error")})
	})
	hookErr := errors.New("destination not ready")
	hooks := &Hooks{PostDump: func(context.Context) error { return hookErr }}
	res, err := s.call(context.Background(), dumpReq, rpcpb.CriuReqType_DUMP, hooks)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if answer.GetNotifySuccess() || answer.NotifySuccess == nil {
		t.Fatalf("answer to post-dump %v, want notify_success=false", answer)
	}
	ferr := s.result(opInfo{op: "dump", pid: 42}, res, nil)
	var e *Error
	if !errors.As(ferr, &e) || !errors.Is(ferr, ErrNotifyFailed) || !errors.Is(ferr, hookErr) {
		t.Fatalf("error %v does not wrap ErrNotifyFailed and the hook's error", ferr)
	}
	if e.Msg != "notification handler failed: post-dump: destination not ready" {
		t.Fatalf("Msg %q", e.Msg)
	}
	if !strings.HasPrefix(ferr.Error(), "dump of pid 42 failed: ") {
		t.Fatalf("Error() = %q", ferr.Error())
	}
}

func TestCallOrphanPtsMasterFD(t *testing.T) {
	s, peer := newFakeSession(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := runPeer(peer, func(p *fakeCRIU) {
		p.recv()
		p.send(notifyResp("orphan-pts-master", 0), int(w.Fd()))
		w.Close()
		p.recv()
		// An fd passed with another notification is not leaked to the
		// notifier.
		p.send(notifyResp("post-restore", 77))
		p.recv()
		p.send(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_RESTORE.Enum(), Success: proto.Bool(true),
			Restore: &rpcpb.CriuRestoreResp{Pid: proto.Int32(77)}})
	})
	var got *os.File
	var postPID int
	hooks := &Hooks{
		OrphanPtsMaster: func(_ context.Context, f *os.File) error { got = f; return nil },
		PostRestore:     func(_ context.Context, pid int) error { postPID = pid; return nil },
	}
	req := &rpcpb.CriuReq{Type: rpcpb.CriuReqType_RESTORE.Enum()}
	res, err := s.call(context.Background(), req, rpcpb.CriuReqType_RESTORE, hooks)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if res.resp.GetRestore().GetPid() != 77 || postPID != 77 {
		t.Fatalf("restore pid %d, post-restore pid %d", res.resp.GetRestore().GetPid(), postPID)
	}
	if got == nil {
		t.Fatal("orphan-pts-master handler got no file")
	}
	// The received fd is the pipe's write end: what it writes arrives.
	if _, err := got.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	got.Close()
	b, err := io.ReadAll(r)
	if err != nil || string(b) != "x" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestCallBadPeers(t *testing.T) {
	for _, tc := range []struct {
		name string
		play func(p *fakeCRIU)
		want error
	}{
		{"garbage", func(p *fakeCRIU) { p.recv(); p.sendRaw([]byte{0xff, 0xff, 0xff, 0xff}) }, ErrProtocol},
		{"missing required fields", func(p *fakeCRIU) { p.recv(); p.sendRaw([]byte{0x08, 0x01}) }, ErrProtocol},
		{"oversized", func(p *fakeCRIU) { p.recv(); p.sendRaw(make([]byte, maxMessage+1)) }, ErrProtocol},
		{"wrong type", func(p *fakeCRIU) {
			p.recv()
			p.send(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_RESTORE.Enum(), Success: proto.Bool(true)})
		}, ErrProtocol},
		{"notify without stage", func(p *fakeCRIU) {
			p.recv()
			p.send(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_NOTIFY.Enum(), Success: proto.Bool(true)})
		}, ErrProtocol},
		{"hangs up", func(p *fakeCRIU) { p.recv(); p.close() }, ErrCRIUExited},
		{"hangs up after notification", func(p *fakeCRIU) {
			p.recv()
			p.send(notifyResp("pre-dump", 0))
			p.recv()
			p.close()
		}, ErrCRIUExited},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, peer := newFakeSession(t)
			done := runPeer(peer, tc.play)
			_, err := s.call(context.Background(), dumpReq, rpcpb.CriuReqType_DUMP, nil)
			<-done
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			e := s.failure(opInfo{op: "dump", pid: 1}, nil, err)
			if !errors.Is(e, tc.want) || e.Error() == "" {
				t.Fatalf("failure %v does not wrap %v", e, tc.want)
			}
		})
	}
}

func TestCallInvalidRequestAnswer(t *testing.T) {
	// CRIU answers a request it cannot take (e.g. after a pre-dump) with
	// an EMPTY failure.
	s, peer := newFakeSession(t)
	done := runPeer(peer, func(p *fakeCRIU) {
		p.recv()
		p.send(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_EMPTY.Enum(), Success: proto.Bool(false),
			CrErrno: proto.Int32(int32(unix.EINVAL)), CrErrmsg: proto.String("Error (criu/cr-service.c:1): RPC error: Bad req seq")})
	})
	res, err := s.call(context.Background(), dumpReq, rpcpb.CriuReqType_DUMP, nil)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	ferr := s.result(opInfo{op: "dump", pid: 5}, res, nil)
	if !errors.Is(ferr, unix.EINVAL) {
		t.Fatalf("error %v does not unwrap to EINVAL", ferr)
	}
	if !strings.Contains(ferr.Error(), "RPC error: Bad req seq") {
		t.Fatalf("Error() = %q", ferr.Error())
	}
}

func TestCallContextCancelled(t *testing.T) {
	s, peer := newFakeSession(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := runPeer(peer, func(p *fakeCRIU) {
		p.recv()
		// A silent CRIU: the client must give up when ctx ends.
		cancel()
	})
	_, err := s.call(ctx, dumpReq, rpcpb.CriuReqType_DUMP, nil)
	<-done
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}

func TestCallNotifierBlockedPastContext(t *testing.T) {
	s, peer := newFakeSession(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := runPeer(peer, func(p *fakeCRIU) {
		p.recv()
		p.send(notifyResp("post-dump", 0))
		p.recv() // the answer, or nothing when the client gave up
	})
	n := NotifyFunc(func(ctx context.Context, n Notification) error {
		cancel()
		<-ctx.Done()
		return ctx.Err()
	})
	_, err := s.call(ctx, dumpReq, rpcpb.CriuReqType_DUMP, n)
	s.conn.Close()
	<-done
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
}
