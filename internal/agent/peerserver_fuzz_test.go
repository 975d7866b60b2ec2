package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// destHost is a phaul.DestLocal without CRIU: work directories are real
// directories under root, restores return the requested PIDs.
type destHost struct {
	root string

	mu       sync.Mutex
	prepared map[string][]int
	resumed  map[int]bool
}

func newDestHost(root string) *destHost {
	return &destHost{root: root, prepared: map[string][]int{}, resumed: map[int]bool{}}
}

func (d *destHost) Capabilities(context.Context) (phaul.Capabilities, error) {
	return phaul.Capabilities{CRIUVersion: "4.2.1", PageServerHeaderSize: 24, Hostname: "dest"}, nil
}
func (d *destHost) CheckCPU(context.Context, []byte) error { return nil }
func (d *destHost) PIDsInUse([]int) []int                  { return nil }
func (d *destHost) FileProblems([]phaul.FileRef) []string  { return nil }
func (d *destHost) Alive(phaul.RestoredTree) bool          { return true }
func (d *destHost) Kill(phaul.RestoredTree) error          { return nil }
func (d *destHost) Cleanup(id string)                      { os.RemoveAll(filepath.Join(d.root, id)) }
func (d *destHost) NewReceiver(context.Context, string, string, int) (phaul.PageReceiver, error) {
	return pageSink{}, nil
}

func (d *destHost) WorkDir(id string) (string, error) {
	dir := filepath.Join(d.root, id)
	return dir, os.MkdirAll(dir, 0o700)
}

func (d *destHost) Restore(_ context.Context, id, imagesDir string, _ phaul.RestoreOptions) (phaul.RestoredTree, error) {
	ents, err := os.ReadDir(imagesDir)
	if err != nil {
		return phaul.RestoredTree{}, err
	}
	if len(ents) == 0 {
		return phaul.RestoredTree{}, fmt.Errorf("no images in %s", imagesDir)
	}
	pid := 4242
	return phaul.RestoredTree{PID: pid, PIDs: []int{pid}}, nil
}

func (d *destHost) Resume(t phaul.RestoredTree) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.resumed[t.PID] = true
	return nil
}

// pageSink accepts every batch whose payload length matches RawLen for
// uncompressed batches, like a receiver that checks framing.
type pageSink struct{}

func (pageSink) HandleBatch(_ context.Context, b *pagexfer.Batch) error {
	if b.Compression == pagexfer.CompressionNone && uint64(len(b.Payload)) != uint64(b.RawLen) {
		return fmt.Errorf("%w: payload %d bytes, raw length %d", phaul.ErrBadState, len(b.Payload), b.RawLen)
	}
	return nil
}
func (pageSink) FinishFinal(context.Context) error { return nil }
func (pageSink) Close() error                      { return nil }

// peerAPI is the Peer API as gRPC runs it, without the network: requests
// are decoded from bytes with the protobuf codec and dispatched through
// the generated service description and the PeerGuard interceptors.
type peerAPI struct {
	dir   string
	host  *destHost
	dest  *phaul.Destination
	srv   *PeerServer
	guard *PeerGuard
}

func newPeerAPI(t testing.TB) *peerAPI {
	t.Helper()
	dir := t.TempDir()
	j, err := phaul.OpenJournal(filepath.Join(dir, "journal"))
	if err != nil {
		t.Fatal(err)
	}
	h := newDestHost(filepath.Join(dir, "work"))
	dest := phaul.NewDestination(phaul.DestConfig{Local: h, Journal: j, MaxConcurrent: 5, MaxImageBytes: 1 << 20})
	return &peerAPI{
		dir: dir, host: h, dest: dest,
		srv:   &PeerServer{Dest: dest, Log: hclog.NewNullLogger()},
		guard: &PeerGuard{MaxPerPeer: 2, State: func(id string) string { return dest.Status(id).State }},
	}
}

func peerCtx(who string) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(who), Port: 40000}})
}

// unary calls a unary method with the encoded request.
func (p *peerAPI) unary(ctx context.Context, method string, req []byte) (any, error) {
	for _, m := range migratev1.Peer_ServiceDesc.Methods {
		if m.MethodName == method {
			dec := func(v any) error { return decode(req, v) }
			return m.Handler(p.srv, ctx, dec, p.guard.Unary())
		}
	}
	panic("no method " + method)
}

// stream runs a client stream with the encoded messages.
func (p *peerAPI) stream(ctx context.Context, method string, msgs [][]byte) error {
	for _, s := range migratev1.Peer_ServiceDesc.Streams {
		if s.StreamName == method {
			fs := &fakeServerStream{ctx: ctx, msgs: msgs}
			return p.guard.Stream()(p.srv, fs, &grpc.StreamServerInfo{FullMethod: "/migrate.v1.Peer/" + method, IsClientStream: true}, s.Handler)
		}
	}
	panic("no stream " + method)
}

// fakeServerStream delivers encoded messages through the protobuf codec,
// as a gRPC transport does.
type fakeServerStream struct {
	ctx  context.Context
	msgs [][]byte
	sent []any
}

func (s *fakeServerStream) SetHeader(metadata.MD) error  { return nil }
func (s *fakeServerStream) SendHeader(metadata.MD) error { return nil }
func (s *fakeServerStream) SetTrailer(metadata.MD)       {}
func (s *fakeServerStream) Context() context.Context     { return s.ctx }
func (s *fakeServerStream) SendMsg(m any) error          { s.sent = append(s.sent, m); return nil }
func (s *fakeServerStream) RecvMsg(m any) error {
	if len(s.msgs) == 0 {
		return io.EOF
	}
	b := s.msgs[0]
	s.msgs = s.msgs[1:]
	return decode(b, m)
}

// decode unmarshals like gRPC's codec; gRPC reports a message it cannot
// decode as Internal.
func decode(b []byte, m any) error {
	if err := proto.Unmarshal(b, m.(proto.Message)); err != nil {
		return status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err)
	}
	return nil
}

// Operations of a fuzz program.
const (
	opPrepare = iota
	opPages
	opImages
	opRestore
	opCommit
	opAbort
	opStatus
	numOps
)

var opMethods = [numOps]string{"Prepare", "SendPages", "SendImages", "Restore", "Commit", "Abort", "Status"}

// program encodes a sequence of calls: per call one byte (operation in the
// low bits, caller in bit 7), a 2-byte message count for streams, and
// length-prefixed (2 bytes, big endian) encoded messages.
type program struct{ b bytes.Buffer }

func (p *program) call(op int, peerB bool, msgs ...proto.Message) *program {
	c := byte(op)
	if peerB {
		c |= 0x80
	}
	p.b.WriteByte(c)
	if op == opPages || op == opImages {
		binary.Write(&p.b, binary.BigEndian, uint16(len(msgs)))
	}
	for _, m := range msgs {
		raw, err := proto.Marshal(m)
		if err != nil {
			panic(err)
		}
		binary.Write(&p.b, binary.BigEndian, uint16(len(raw)))
		p.b.Write(raw)
	}
	return p
}

func (p *program) bytes() []byte { return append([]byte(nil), p.b.Bytes()...) }

// run executes a program; it stops at the first malformed frame.
func (p *peerAPI) run(t testing.TB, data []byte) {
	next := func(n int) ([]byte, bool) {
		if len(data) < n {
			return nil, false
		}
		b := data[:n]
		data = data[n:]
		return b, true
	}
	msg := func() ([]byte, bool) {
		l, ok := next(2)
		if !ok {
			return nil, false
		}
		return next(int(binary.BigEndian.Uint16(l)))
	}
	for len(data) > 0 {
		c, _ := next(1)
		op, who := int(c[0]&0x7f)%numOps, "10.0.0.1"
		if c[0]&0x80 != 0 {
			who = "10.0.0.2"
		}
		ctx := peerCtx(who)
		var err error
		switch op {
		case opPages, opImages:
			nb, ok := next(2)
			if !ok {
				return
			}
			n := int(binary.BigEndian.Uint16(nb))
			var msgs [][]byte
			for i := 0; i < n && i < 64; i++ {
				m, ok := msg()
				if !ok {
					return
				}
				msgs = append(msgs, m)
			}
			err = p.stream(ctx, opMethods[op], msgs)
		default:
			m, ok := msg()
			if !ok {
				return
			}
			_, err = p.unary(ctx, opMethods[op], m)
		}
		if err != nil {
			if _, isStatus := status.FromError(err); !isStatus {
				t.Fatalf("%s returned a non-status error: %v", opMethods[op], err)
			}
		}
	}
}

// checkFiles fails when anything was written outside a migration's work
// directory or journal: the only entries are journal/ and work/, work/
// holds directories named by valid migration ids, and no symlinks exist.
func (p *peerAPI) checkFiles(t testing.TB) {
	t.Helper()
	err := filepath.WalkDir(p.dir, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			// A committed migration's work directory is removed in the
			// background.
			return nil
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(p.dir, path)
		if d.Type()&fs.ModeSymlink != 0 {
			t.Errorf("symlink %s", rel)
		}
		parts := strings.Split(rel, string(filepath.Separator))
		switch {
		case rel == ".":
		case parts[0] != "journal" && parts[0] != "work":
			t.Errorf("file outside the work and journal directories: %s", rel)
		case parts[0] == "work" && len(parts) >= 2 && !phaul.ValidID(parts[1]):
			t.Errorf("work directory of an invalid id: %s", rel)
		case parts[0] == "work" && len(parts) >= 4 && parts[2] == "images" && len(parts) != 4:
			t.Errorf("image below the images directory: %s", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// validMigration is a complete, well-formed migration of id.
func validMigration(p *program, id string, peerB bool) *program {
	img := []byte("core image contents")
	sum := sha256.Sum256(img)
	return p.call(opPrepare, peerB, &migratev1.PrepareRequest{MigrationId: id, Pids: []int32{4242}, Source: &migratev1.Capabilities{CriuVersion: "4.2.1", PageServerHeaderSize: 24}}).
		call(opPages, peerB,
			&migratev1.PageBatch{MigrationId: id, Kind: uint32(pagexfer.BatchPrecopy), Seq: 1, Payload: []byte("abcd"), RawLen: 4},
			&migratev1.PageBatch{MigrationId: id, Kind: uint32(pagexfer.BatchFinal), Seq: 2, Payload: []byte("ef"), RawLen: 2, Last: true}).
		call(opImages, peerB,
			&migratev1.ImageChunk{MigrationId: id, Name: "core-4242.img", Data: img[:5]},
			&migratev1.ImageChunk{MigrationId: id, Name: "core-4242.img", Offset: 5, Data: img[5:], Last: true, Sha256: sum[:]}).
		call(opRestore, peerB, &migratev1.RestoreRequest{MigrationId: id}).
		call(opCommit, peerB, &migratev1.CommitRequest{MigrationId: id})
}

// fuzzSeeds are the committed corpus of FuzzPeerAPI (see
// TestFuzzPeerAPISeeds).
func fuzzSeeds() map[string][]byte {
	img := []byte("x")
	sum := sha256.Sum256(img)
	seeds := map[string][]byte{
		"valid": validMigration(&program{}, "m1", false).bytes(),
		"traversal": (&program{}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m2", Pids: []int32{7}}).
			call(opImages, false,
				&migratev1.ImageChunk{MigrationId: "m2", Name: "../../evil", Data: img, Last: true, Sha256: sum[:]},
				&migratev1.ImageChunk{MigrationId: "m2", Name: "/etc/evil", Data: img, Last: true, Sha256: sum[:]},
				&migratev1.ImageChunk{MigrationId: "m2", Name: "..", Data: img, Last: true, Sha256: sum[:]}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "../m3", Pids: []int32{7}}).bytes(),
		"out-of-order": (&program{}).
			call(opRestore, false, &migratev1.RestoreRequest{MigrationId: "m4"}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m4", Pids: []int32{7}}).
			call(opCommit, false, &migratev1.CommitRequest{MigrationId: "m4"}).
			call(opRestore, false, &migratev1.RestoreRequest{MigrationId: "m4"}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m4", Pids: []int32{7}}).
			call(opPages, false, &migratev1.PageBatch{MigrationId: "m4", Kind: 9}).
			call(opAbort, false, &migratev1.AbortRequest{MigrationId: "m4"}).
			call(opPages, false, &migratev1.PageBatch{MigrationId: "m4", Kind: uint32(pagexfer.BatchFinal), Last: true}).bytes(),
		"other-peer": (&program{}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m5", Pids: []int32{7}}).
			call(opAbort, true, &migratev1.AbortRequest{MigrationId: "m5"}).
			call(opPages, true, &migratev1.PageBatch{MigrationId: "m5", Kind: uint32(pagexfer.BatchFinal), Last: true}).
			call(opStatus, true, &migratev1.PeerStatusRequest{MigrationId: "m5"}).bytes(),
		"mixed-stream": (&program{}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m6", Pids: []int32{7}}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m7", Pids: []int32{8}}).
			call(opImages, false,
				&migratev1.ImageChunk{MigrationId: "m6", Name: "a.img", Data: img},
				&migratev1.ImageChunk{MigrationId: "m7", Name: "a.img", Data: img}).
			call(opPrepare, false, &migratev1.PrepareRequest{MigrationId: "m8", Pids: []int32{9}}).bytes(),
		"bad-proto": {opPrepare, 0, 3, 0xff, 0xff, 0xff, opStatus, 0, 2, 0x0a, 0x7f},
	}
	return seeds
}

var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/fuzz/FuzzPeerAPI from fuzzSeeds")

// TestFuzzPeerAPISeeds checks that the committed corpus matches fuzzSeeds;
// -update-seeds rewrites it.
func TestFuzzPeerAPISeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzPeerAPI")
	for name, b := range fuzzSeeds() {
		want := "go test fuzz v1\n[]byte(" + strconv.Quote(string(b)) + ")\n"
		path := filepath.Join(dir, name)
		if *updateSeeds {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != want {
			t.Errorf("%s is missing or stale (go test -run TestFuzzPeerAPISeeds -update-seeds): %v", path, err)
		}
	}
}

// FuzzPeerAPI drives the Peer API's request decoding and handlers with
// arbitrary call sequences from two peers. Whatever they send: no panic,
// every error is a gRPC status, nothing is written outside a migration's
// work directory, and a third peer can still complete a migration (one
// peer's migrations cannot take every slot).
func FuzzPeerAPI(f *testing.F) {
	for _, b := range fuzzSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p := newPeerAPI(t)
		defer p.dest.Close()
		p.run(t, data)
		p.checkFiles(t)

		ctx := peerCtx("10.0.0.3")
		prog := validMigration(&program{}, "final-check", false).bytes()
		if err := p.runStrict(ctx, prog); err != nil {
			t.Fatalf("a fresh migration from another peer failed after the sequence: %v", err)
		}
		if st := p.dest.Status("final-check").State; st != phaul.DestCommitted {
			t.Fatalf("the fresh migration ended in state %s, want committed", st)
		}
	})
}

// runStrict runs a well-formed program as ctx's peer and returns the first
// error.
func (p *peerAPI) runStrict(ctx context.Context, data []byte) error {
	for len(data) > 0 {
		op := int(data[0]&0x7f) % numOps
		data = data[1:]
		var msgs [][]byte
		n := 1
		if op == opPages || op == opImages {
			n = int(binary.BigEndian.Uint16(data))
			data = data[2:]
		}
		for i := 0; i < n; i++ {
			l := int(binary.BigEndian.Uint16(data))
			msgs = append(msgs, data[2:2+l])
			data = data[2+l:]
		}
		var err error
		if op == opPages || op == opImages {
			err = p.stream(ctx, opMethods[op], msgs)
		} else {
			_, err = p.unary(ctx, opMethods[op], msgs[0])
		}
		if err != nil {
			return fmt.Errorf("%s: %w", opMethods[op], err)
		}
	}
	return nil
}
