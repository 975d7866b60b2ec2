package pagexfer_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/test/e2e"
)

// These tests run real CRIU in the test's own namespaces: a memhog
// workload is dumped with its page stream going through ForwardDump, a
// Sender, a gRPC Peer.SendPages stream on loopback, a Receiver and its
// replay into `criu page-server`; then the images are restored (the
// dumped process was killed by the dump, so its PID is free again) and
// the workload checks its memory.

var recordTo = flag.String("record-psproto", "", "write a trimmed recording of the real CRIU dump stream to this file")

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func testLogger(t testing.TB, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Info, Output: testWriter{t}})
}

// memhog is the workload, a session leader child of the test.
type memhog struct {
	pid    int
	status string
	cmd    *exec.Cmd
}

func startMemhog(t testing.TB, mib int, extra ...string) *memhog {
	t.Helper()
	dir := t.TempDir()
	w := &memhog{status: filepath.Join(dir, "status")}
	args := append([]string{"--mem", strconv.Itoa(mib), "--status", w.status}, extra...)
	cmd := exec.Command(e2e.MemhogBinary(t), args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.cmd, w.pid = cmd, cmd.Process.Pid
	t.Cleanup(func() { w.kill(t) })
	w.wait(t, "first status", func(s e2e.WorkloadStatus) bool { return s.PID == w.pid && s.Counter > 0 })
	return w
}

func (w *memhog) kill(t testing.TB) {
	if w.cmd != nil {
		_ = w.cmd.Process.Kill()
		_ = w.cmd.Wait()
		w.cmd = nil
		return
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", w.pid)); err == nil && strings.TrimSpace(string(comm)) == "memhog" {
		if err := criurpc.KillTree(w.pid); err != nil {
			t.Logf("kill restored workload %d: %v", w.pid, err)
		}
	}
}

func (w *memhog) read() (e2e.WorkloadStatus, error) {
	b, err := os.ReadFile(w.status)
	if err != nil {
		return e2e.WorkloadStatus{}, err
	}
	return e2e.ParseWorkloadStatus(b)
}

// wait polls the status file; the minute bounds a hang, not speed.
func (w *memhog) wait(t testing.TB, what string, cond func(e2e.WorkloadStatus) bool) e2e.WorkloadStatus {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		s, err := w.read()
		if err == nil && cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %d: %s: not reached (last status %+v, %v)", w.pid, what, s, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (w *memhog) verify(t testing.TB) e2e.WorkloadStatus {
	t.Helper()
	before, err := w.read()
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(w.pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("signal workload %d: %v", w.pid, err)
	}
	s := w.wait(t, "verification", func(s e2e.WorkloadStatus) bool { return s.VerifyCount > before.VerifyCount })
	if s.Verify != "ok" || s.ColdSumNow != s.ColdSum {
		t.Fatalf("workload %d memory changed: verify=%s, checksum %s, at start %s", w.pid, s.Verify, s.ColdSumNow, s.ColdSum)
	}
	return s
}

// socketpair returns two connected unix stream sockets: ours as a
// net.Conn, theirs as the *os.File CRIU inherits.
func socketpair(t testing.TB) (net.Conn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		// Room for a few MiB in flight each way, so neither end waits for
		// the other on every page-pipe buffer.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	ours := os.NewFile(uintptr(fds[0]), "pagexfer")
	theirs := os.NewFile(uintptr(fds[1]), "criu")
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); theirs.Close() })
	return conn, theirs
}

// peer is the destination side behind a real gRPC Peer.SendPages stream.
type peer struct {
	migratev1.UnimplementedPeerServer
	recv *pagexfer.Receiver
}

func (p *peer) SendPages(stream grpc.ClientStreamingServer[migratev1.PageBatch, migratev1.SendPagesResponse]) error {
	var n uint64
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&migratev1.SendPagesResponse{Batches: n, PagesStored: p.recv.Stats().PagesStored})
		}
		if err != nil {
			return err
		}
		b := &pagexfer.Batch{Kind: pagexfer.BatchKind(m.GetKind()), Seq: m.GetSeq(), Payload: m.GetPayload(),
			RawLen: m.GetRawLen(), Checksum: m.GetChecksum(), Last: m.GetLast()}
		if m.GetCompression() == migratev1.Compression_COMPRESSION_ZSTD {
			b.Compression = pagexfer.CompressionZstd
		}
		if err := p.recv.HandleBatch(stream.Context(), b); err != nil {
			return err
		}
		n++
	}
}

// grpcSink sends batches on a SendPages stream.
type grpcSink struct {
	stream grpc.ClientStreamingClient[migratev1.PageBatch, migratev1.SendPagesResponse]
}

func (s *grpcSink) SendBatch(ctx context.Context, b *pagexfer.Batch) error {
	c := migratev1.Compression_COMPRESSION_NONE
	if b.Compression == pagexfer.CompressionZstd {
		c = migratev1.Compression_COMPRESSION_ZSTD
	}
	return s.stream.Send(&migratev1.PageBatch{MigrationId: "test", Kind: uint32(b.Kind), Seq: b.Seq, Compression: c,
		Payload: b.Payload, RawLen: b.RawLen, Checksum: b.Checksum, Last: b.Last})
}

// link is a Sender and a Receiver joined by gRPC on loopback.
type link struct {
	sender *pagexfer.Sender
	recv   *pagexfer.Receiver
	store  *pagexfer.Store
	stream grpc.ClientStreamingClient[migratev1.PageBatch, migratev1.SendPagesResponse]
}

func newLink(t testing.TB, opts pagexfer.SenderOptions) *link {
	t.Helper()
	store, err := pagexfer.NewStore(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	recv, err := pagexfer.NewReceiver(store, pagexfer.ReceiverOptions{Logger: testLogger(t, "receiver")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { recv.Close() })
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Large flow-control windows and buffers: with gRPC's defaults (64 KiB
	// windows, 32 KiB buffers) a stream of MiB-sized messages spends its
	// time in window updates and small writes.
	srv := grpc.NewServer(grpc.InitialWindowSize(8<<20), grpc.InitialConnWindowSize(16<<20),
		grpc.ReadBufferSize(1<<20), grpc.WriteBufferSize(1<<20), grpc.MaxRecvMsgSize(pagexfer.MaxBatchWire+4096))
	migratev1.RegisterPeerServer(srv, &peer{recv: recv})
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(8<<20), grpc.WithInitialConnWindowSize(16<<20),
		grpc.WithReadBufferSize(1<<20), grpc.WithWriteBufferSize(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := migratev1.NewPeerClient(cc).SendPages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	opts.Logger = testLogger(t, "sender")
	sender, err := pagexfer.NewSender(&grpcSink{stream: stream}, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sender.Close() })
	return &link{sender: sender, recv: recv, store: store, stream: stream}
}

// migrateResult is what one dump through the link did.
type migrateResult struct {
	dump     pagexfer.DumpStats
	criu     *criurpc.DumpStats
	elapsed  time.Duration
	imgBytes int64
}

// dumpThrough dumps w through the link into a page server writing dstDir,
// and copies the dump's other images there.
func dumpThrough(t testing.TB, c *criurpc.Client, hdr int, l *link, w *memhog, dstDir string) migrateResult {
	t.Helper()
	ctx := context.Background()
	srcDir := t.TempDir()

	psConn, psFile := socketpair(t)
	ps, err := c.StartPageServer(ctx, criurpc.PageServerOptions{ImagesDir: dstDir, Conn: psFile, LogLevel: criurpc.LogLevel(4)})
	if err != nil {
		t.Fatal(err)
	}
	psFile.Close()
	psDone := false
	t.Cleanup(func() {
		if !psDone {
			_ = ps.Kill()
		}
	})
	if err := l.recv.StartReplay(ctx, psConn, hdr); err != nil {
		t.Fatal(err)
	}

	dumpConn, dumpFile := socketpair(t)
	var rec *recorder
	var src io.ReadWriter = dumpConn
	if *recordTo != "" {
		rec = &recorder{Conn: dumpConn}
		src = rec
	}
	type fwd struct {
		st  pagexfer.DumpStats
		err error
	}
	fwdc := make(chan fwd, 1)
	start := time.Now()
	go func() {
		st, err := pagexfer.ForwardDump(ctx, src, hdr, l.sender)
		fwdc <- fwd{st, err}
	}()
	criuStats, err := c.Dump(ctx, criurpc.DumpOptions{ImagesDir: srcDir, PID: w.pid, PageServer: &criurpc.PageServerTarget{Conn: dumpFile}}, nil)
	dumpFile.Close()
	if err != nil {
		dumpConn.Close()
		<-fwdc
		t.Fatalf("dump: %v", err)
	}
	f := <-fwdc
	if f.err != nil {
		t.Fatalf("forward: %v", f.err)
	}
	if err := l.recv.Finish(ctx); err != nil {
		t.Fatalf("replay: %v", err)
	}
	psConn.Close()
	if err := ps.Wait(ctx); err != nil {
		t.Fatalf("page server: %v", err)
	}
	psDone = true
	elapsed := time.Since(start)
	_ = w.cmd.Wait() // the dump killed it
	w.cmd = nil
	if rec != nil {
		if err := rec.write(*recordTo, hdr); err != nil {
			t.Fatal(err)
		}
	}
	copyImages(t, srcDir, dstDir)
	return migrateResult{dump: f.st, criu: criuStats, elapsed: elapsed, imgBytes: dirSize(t, dstDir, "pages-")}
}

// copyImages copies the non-memory images of a dump next to the pages.
func copyImages(t testing.TB, from, to string) {
	t.Helper()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".img") {
			continue
		}
		if _, err := os.Stat(filepath.Join(to, e.Name())); err == nil {
			t.Fatalf("image %s exists on both sides", e.Name())
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func dirSize(t testing.TB, dir, prefix string) int64 {
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			if fi, err := e.Info(); err == nil {
				n += fi.Size()
			}
		}
	}
	return n
}

func restore(t testing.TB, c *criurpc.Client, w *memhog, dir string) {
	t.Helper()
	res, err := c.Restore(context.Background(), criurpc.RestoreOptions{ImagesDir: dir}, nil)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if res.PID != w.pid {
		t.Fatalf("restored PID %d, dumped %d", res.PID, w.pid)
	}
}

func realClient(t testing.TB) (*criurpc.Client, int) {
	t.Helper()
	c := criurpc.New(criurpc.WithPath(e2e.RequireCRIU(t)))
	caps, err := c.Probe(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return c, caps.PageServerHeaderSize
}

const realMiB = 256

func TestRealDumpRestore(t *testing.T) {
	for _, comp := range []pagexfer.Compression{pagexfer.CompressionNone, pagexfer.CompressionZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			c, hdr := realClient(t)
			w := startMemhog(t, realMiB, "--hot", "1")
			l := newLink(t, pagexfer.SenderOptions{Compression: comp})
			dst := t.TempDir()
			r := dumpThrough(t, c, hdr, l, w, dst)
			restore(t, c, w, dst)
			w.verify(t)
			cnt := r.dump.Counters
			t.Logf("dump: %d pages from CRIU in %v; sent %d, referenced %d, zero %d; raw %d B, wire %d B",
				r.dump.Pages, r.elapsed, cnt.PagesSent, cnt.PagesReferenced, cnt.PagesZero, cnt.RawBytes, cnt.WireBytes)
			if r.dump.Pages < realMiB*256 {
				t.Fatalf("CRIU sent %d pages for a %d MiB workload", r.dump.Pages, realMiB)
			}
			if cnt.PagesSent+cnt.PagesReferenced+cnt.PagesZero != r.dump.Pages {
				t.Fatalf("counters %+v do not add up to %d pages", cnt, r.dump.Pages)
			}
			if r.criu != nil && r.criu.PagesWritten != r.dump.Pages {
				t.Fatalf("CRIU wrote %d pages, ForwardDump saw %d", r.criu.PagesWritten, r.dump.Pages)
			}
			if got := l.recv.Stats().PagesReplayed; got != r.dump.Pages {
				t.Fatalf("replayed %d pages, CRIU sent %d", got, r.dump.Pages)
			}
			if r.imgBytes < int64(r.dump.Pages)*pagexfer.PageSize {
				t.Fatalf("pages images hold %d bytes for %d pages", r.imgBytes, r.dump.Pages)
			}
		})
	}
}

func TestRealPrecopyThenDump(t *testing.T) {
	c, hdr := realClient(t)
	w := startMemhog(t, realMiB, "--hot", "1")
	l := newLink(t, pagexfer.SenderOptions{Compression: pagexfer.CompressionZstd})
	sc := pagexfer.NewScanner([]int{w.pid}, pagexfer.ScannerOptions{Logger: testLogger(t, "scanner")})
	var last pagexfer.RoundStats
	for i := 0; i < 3; i++ {
		st, err := sc.Round(context.Background(), l.sender)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: scanned %d, changed %d, sent %d, wire %d B, %v, dirty %.1f MB/s",
			st.Round, st.PagesScanned, st.PagesChanged, st.PagesSent, st.BytesWire, st.Duration, st.DirtyRate/1e6)
		last = st
	}
	if last.PagesScanned < realMiB*256 || last.PagesChanged > last.PagesScanned/10 {
		t.Fatalf("last round: %+v", last)
	}
	dst := t.TempDir()
	r := dumpThrough(t, c, hdr, l, w, dst)
	restore(t, c, w, dst)
	w.verify(t)
	cnt := r.dump.Counters
	t.Logf("final dump after pre-copy: %d pages; sent %d, referenced %d, zero %d; wire %d B (%.2f%% of memory)",
		r.dump.Pages, cnt.PagesSent, cnt.PagesReferenced, cnt.PagesZero, cnt.WireBytes,
		100*float64(cnt.WireBytes)/float64(r.dump.Pages*pagexfer.PageSize))
	// The hot MiB (256 pages) changes all the time; everything else was
	// pre-copied and must go as references.
	if cnt.PagesSent > r.dump.Pages/20 {
		t.Fatalf("final dump sent %d of %d pages as data", cnt.PagesSent, r.dump.Pages)
	}
	if cnt.PagesReferenced < r.dump.Pages*9/10 {
		t.Fatalf("final dump referenced only %d of %d pages", cnt.PagesReferenced, r.dump.Pages)
	}
	if cnt.WireBytes > uint64(r.dump.Pages)*pagexfer.PageSize/20 {
		t.Fatalf("final dump put %d bytes on the wire for %d pages", cnt.WireBytes, r.dump.Pages)
	}
}

// recorder keeps what CRIU writes, for -record-psproto.
type recorder struct {
	net.Conn
	mu  sync.Mutex
	got []byte
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	r.mu.Lock()
	r.got = append(r.got, p[:n]...)
	r.mu.Unlock()
	return n, err
}

// write stores a trimmed copy of the recorded stream: every command as
// CRIU sent it, but at most one page of data per command and at most
// eight page commands per image.
func (r *recorder) write(path string, hdr int) error {
	var out []byte
	b := r.got
	perImage := 0
	for len(b) >= hdr {
		h := append([]byte(nil), b[:hdr]...)
		b = b[hdr:]
		cmd := le32(h[0:])
		op, flags := cmd&0xffff, cmd>>16
		var nr uint64
		if hdr == 32 {
			nr = le64(h[8:])
		} else {
			nr = uint64(le32(h[4:]))
		}
		data := 0
		if op == 1 || (op == 6 && flags&4 != 0) {
			data = int(nr) * 4096
		}
		if data > len(b) {
			return errors.New("recording ends inside a payload")
		}
		payload := b[:data]
		b = b[data:]
		switch {
		case op == 3 || op == 4:
			perImage = 0
		case op == 1 || op == 2 || op == 6:
			perImage++
			if perImage > 8 {
				continue
			}
			if data > 4096 {
				payload = payload[:4096]
				if hdr == 32 {
					putLE64(h[8:], 1)
				} else {
					putLE32(h[4:], 1)
				}
			}
		}
		out = append(out, h...)
		out = append(out, payload...)
	}
	return os.WriteFile(path, out, 0o644)
}

func le32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
func le64(b []byte) uint64 { return uint64(le32(b)) | uint64(le32(b[4:]))<<32 }
func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func putLE64(b []byte, v uint64) { putLE32(b, uint32(v)); putLE32(b[4:], uint32(v>>32)) }
