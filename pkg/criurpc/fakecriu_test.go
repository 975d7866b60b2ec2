package criurpc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// fakeCRIUEnv, when set, turns the test binary into a fake `criu swrk 3`
// that plays the named scenario: the client then runs against a real child
// process with real fds, whose behaviour CRIU on this kernel cannot show
// (pre-dump sessions) or would not show on purpose (garbage, hangs).
const fakeCRIUEnv = "CRIURPC_FAKE_CRIU"

// fakePIDFileEnv names a file the fake CRIU writes its PID to.
const fakePIDFileEnv = "CRIURPC_FAKE_CRIU_PIDFILE"

func runFakeCRIU(scenario string) int {
	if f := os.Getenv(fakePIDFileEnv); f != "" {
		os.WriteFile(f, []byte(strconv.Itoa(os.Getpid())), 0o644)
	}
	if len(os.Args) != 3 || os.Args[1] != "swrk" || os.Args[2] != "3" {
		fmt.Fprintf(os.Stderr, "fake criu: args %q, want swrk 3\n", os.Args[1:])
		return 2
	}
	p := &fakeCRIU{fd: 3}
	fail := func(format string, a ...any) int {
		// The client sees the violation as CRIU's error message.
		p.sendQuiet(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_EMPTY.Enum(), Success: proto.Bool(false),
			CrErrmsg: proto.String(fmt.Sprintf(format, a...))})
		return 1
	}
	switch scenario {
	case "predump-session":
		req := p.recvQuiet()
		if req.GetType() != rpcpb.CriuReqType_FEATURE_CHECK || !req.GetKeepOpen() || !req.GetFeatures().GetMemTrack() {
			return fail("want a kept-open feature check for mem_track first, got %v", req)
		}
		p.sendQuiet(&rpcpb.CriuResp{Type: rpcpb.CriuReqType_FEATURE_CHECK.Enum(), Success: proto.Bool(true),
			Features: &rpcpb.CriuFeatures{MemTrack: proto.Bool(true), LazyPages: proto.Bool(true)}})
		for i, want := range []rpcpb.CriuReqType{rpcpb.CriuReqType_PRE_DUMP, rpcpb.CriuReqType_PRE_DUMP, rpcpb.CriuReqType_DUMP} {
			req := p.recvQuiet()
			o := req.GetOpts()
			if req.GetType() != want {
				return fail("request %d: type %v, want %v", i, req.GetType(), want)
			}
			if want == rpcpb.CriuReqType_PRE_DUMP && !o.GetTrackMem() {
				return fail("pre-dump %d without track_mem", i)
			}
			if i > 0 && o.GetParentImg() != "../"+strconv.Itoa(i) {
				return fail("request %d: parent %q", i, o.GetParentImg())
			}
			// The page-stream socket is the inherited fd 4 in every round.
			if o.GetPs().GetFd() != 4 {
				return fail("request %d: ps %v", i, o.GetPs())
			}
			if _, err := unix.Write(4, []byte{byte('a' + i)}); err != nil {
				return fail("request %d: write ps fd: %v", i, err)
			}
			// The images dir is reachable through the client's fd.
			dir := fmt.Sprintf("/proc/%d/fd/%d", os.Getppid(), o.GetImagesDirFd())
			if err := os.WriteFile(filepath.Join(dir, "stats-dump"), fakeStats(uint64(100+i)), 0o644); err != nil {
				return fail("request %d: images dir: %v", i, err)
			}
			p.sendQuiet(&rpcpb.CriuResp{Type: want.Enum(), Success: proto.Bool(true)})
		}
		if req := p.recvQuiet(); req != nil {
			return fail("request after the dump: %v", req)
		}
		return 0
	case "garbage":
		p.recvQuiet()
		p.sendRawQuiet([]byte("this is not a protobuf message"))
		select {} // until killed
	case "hang":
		p.recvQuiet()
		select {}
	case "die":
		p.recvQuiet()
		fmt.Fprintln(os.Stderr, "fake criu: segmentation fault in the fake")
		return 139
	}
	return fail("unknown scenario %q", scenario)
}

// fakeStats returns a stats-dump image with pagesWritten.
func fakeStats(pagesWritten uint64) []byte {
	e := &rpcpb.StatsEntry{Dump: &rpcpb.DumpStatsEntry{
		FreezingTime: proto.Uint32(1), FrozenTime: proto.Uint32(2), MemdumpTime: proto.Uint32(3),
		MemwriteTime: proto.Uint32(4), PagesScanned: proto.Uint64(pagesWritten), PagesSkippedParent: proto.Uint64(0),
		PagesWritten: proto.Uint64(pagesWritten), PagesLazy: proto.Uint64(0),
	}}
	pb, _ := proto.Marshal(e)
	b := binary.NativeEndian.AppendUint32(nil, imgServiceMagic)
	b = binary.NativeEndian.AppendUint32(b, statsMagic)
	b = binary.NativeEndian.AppendUint32(b, uint32(len(pb)))
	return append(b, pb...)
}

func (p *fakeCRIU) recvQuiet() *rpcpb.CriuReq {
	buf := make([]byte, 64<<10)
	n, _, _, _, err := unix.Recvmsg(p.fd, buf, nil, 0)
	if err != nil || n == 0 {
		return nil
	}
	req := new(rpcpb.CriuReq)
	if proto.Unmarshal(buf[:n], req) != nil {
		return nil
	}
	return req
}

func (p *fakeCRIU) sendQuiet(resp *rpcpb.CriuResp) {
	b, _ := proto.Marshal(resp)
	p.sendRawQuiet(b)
}

func (p *fakeCRIU) sendRawQuiet(b []byte) { unix.Sendmsg(p.fd, b, nil, nil, 0) }

// fakeClient returns a Client whose criu is the test binary playing
// scenario, and a function returning the fake's PID once it started.
func fakeClient(t *testing.T, scenario string) (*Client, func() int) {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "pid")
	t.Setenv(fakeCRIUEnv, scenario)
	t.Setenv(fakePIDFileEnv, pidFile)
	return &Client{Path: os.Args[0]}, func() int {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			t.Fatalf("fake criu wrote no PID: %v", err)
		}
		pid, _ := strconv.Atoi(string(b))
		return pid
	}
}

// requireReaped fails unless pid no longer exists as the test's child.
func requireReaped(t *testing.T, pid int) {
	t.Helper()
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil); !errors.Is(err, syscall.ECHILD) {
		t.Fatalf("criu PID %d is still the test's child (wait4: %v)", pid, err)
	}
}

func TestFakePreDumpSession(t *testing.T) {
	c, fakePID := fakeClient(t, "predump-session")
	ctx := t.Context()
	root := t.TempDir()
	dirs := make([]string, 3)
	for i := range dirs {
		dirs[i] = filepath.Join(root, strconv.Itoa(i+1))
		if err := os.Mkdir(dirs[i], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ours, theirs := socketpair(t)
	defer ours.Close()
	ps := &PageServerTarget{Conn: theirs}
	s, err := c.PreDump(ctx, DumpOptions{ImagesDir: dirs[0], PID: 4242, PageServer: ps}, nil)
	theirs.Close()
	if err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st == nil || st.PagesWritten != 100 {
		t.Fatalf("first round stats %+v", st)
	}
	if err := s.PreDump(ctx, DumpOptions{ImagesDir: dirs[1], ParentImage: "../1", PageServer: ps}); err != nil {
		t.Fatal(err)
	}
	// A connection that was not passed at the start cannot be used.
	other, other2 := socketpair(t)
	defer other.Close()
	defer other2.Close()
	err = s.PreDump(ctx, DumpOptions{ImagesDir: dirs[1], PageServer: &PageServerTarget{Conn: other}})
	if !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("pre-dump with a new connection: %v", err)
	}
	st, err := s.Dump(ctx, DumpOptions{ImagesDir: dirs[2], ParentImage: "../2", PageServer: ps}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st == nil || st.PagesWritten != 102 {
		t.Fatalf("dump stats %+v", st)
	}
	if _, err := s.Dump(ctx, DumpOptions{ImagesDir: dirs[2]}, nil); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("second dump: %v", err)
	}
	s.Close()
	requireReaped(t, fakePID())
	// Every round wrote into the same inherited connection.
	b := make([]byte, 8)
	ours.SetReadDeadline(time.Now().Add(time.Minute))
	n, err := ours.Read(b)
	if err != nil || string(b[:n]) != "abc" {
		t.Fatalf("page stream %q, %v", b[:n], err)
	}
}

func TestFakeCRIUMisbehaves(t *testing.T) {
	for _, tc := range []struct {
		scenario string
		cancel   bool
		want     error
		msg      string
	}{
		{scenario: "garbage", want: ErrProtocol},
		{scenario: "hang", cancel: true, want: context.Canceled},
		{scenario: "die", want: ErrCRIUExited, msg: "segmentation fault in the fake"},
	} {
		t.Run(tc.scenario, func(t *testing.T) {
			c, fakePID := fakeClient(t, tc.scenario)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if tc.cancel {
				// Cancel once the fake runs and waits.
				go func() {
					for {
						if _, err := os.Stat(os.Getenv(fakePIDFileEnv)); err == nil {
							time.Sleep(10 * time.Millisecond)
							cancel()
							return
						}
						select {
						case <-ctx.Done():
							return
						case <-time.After(time.Millisecond):
						}
					}
				}()
			}
			_, err := c.Dump(ctx, DumpOptions{ImagesDir: t.TempDir(), PID: 4242}, nil)
			if !errors.Is(err, tc.want) {
				t.Fatalf("dump: %v, want %v", err, tc.want)
			}
			if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("error %q does not carry CRIU's stderr %q", err, tc.msg)
			}
			t.Logf("%s: %v", tc.scenario, err)
			requireReaped(t, fakePID())
		})
	}
}
