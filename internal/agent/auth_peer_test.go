package agent

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s: code %s (%v), want %s", what, got, err, want)
	}
}

func (p *peerAPI) prepare(t *testing.T, who, id string) error {
	t.Helper()
	_, err := p.unary(peerCtx(who), "Prepare", mustMarshal(t, &migratev1.PrepareRequest{MigrationId: id, Pids: []int32{7}}))
	return err
}

func TestPeerGuardOwnership(t *testing.T) {
	p := newPeerAPI(t)
	defer p.dest.Close()
	a, b := "10.0.0.1", "10.0.0.2"
	if err := p.prepare(t, a, "m1"); err != nil {
		t.Fatal(err)
	}
	// Another peer may neither prepare the same id, nor act on it.
	wantCode(t, "prepare of another peer's id", p.prepare(t, b, "m1"), codes.PermissionDenied)
	_, err := p.unary(peerCtx(b), "Abort", mustMarshal(t, &migratev1.AbortRequest{MigrationId: "m1"}))
	wantCode(t, "abort by another peer", err, codes.PermissionDenied)
	_, err = p.unary(peerCtx(b), "Status", mustMarshal(t, &migratev1.PeerStatusRequest{MigrationId: "m1"}))
	wantCode(t, "status by another peer", err, codes.PermissionDenied)
	err = p.stream(peerCtx(b), "SendPages", [][]byte{mustMarshal(t, &migratev1.PageBatch{MigrationId: "m1", Kind: uint32(pagexfer.BatchPrecopy)})})
	wantCode(t, "pages by another peer", err, codes.PermissionDenied)
	// A stream that starts with the peer's own migration cannot slip in
	// another's.
	if err := p.prepare(t, b, "m2"); err != nil {
		t.Fatal(err)
	}
	err = p.stream(peerCtx(b), "SendImages", [][]byte{
		mustMarshal(t, &migratev1.ImageChunk{MigrationId: "m2", Name: "a.img", Data: []byte("x")}),
		mustMarshal(t, &migratev1.ImageChunk{MigrationId: "m1", Name: "a.img", Data: []byte("x")}),
	})
	if c := status.Code(err); c != codes.PermissionDenied && c != codes.InvalidArgument {
		t.Fatalf("mixed stream: %v", err)
	}
	if st := p.dest.Status("m1").State; st != phaul.DestPrepared {
		t.Fatalf("m1 is %s after the other peer's calls, want prepared", st)
	}
	// The owner still can.
	_, err = p.unary(peerCtx(a), "Abort", mustMarshal(t, &migratev1.AbortRequest{MigrationId: "m1", Reason: "test"}))
	if err != nil {
		t.Fatal(err)
	}
	// A repeated Prepare by the owner is idempotent.
	if err := p.prepare(t, b, "m2"); err != nil {
		t.Fatalf("repeated prepare: %v", err)
	}
}

func TestPeerGuardPerPeerLimit(t *testing.T) {
	p := newPeerAPI(t) // two per peer, five in all
	defer p.dest.Close()
	a, b := "10.0.0.1", "10.0.0.2"
	for _, id := range []string{"a1", "a2"} {
		if err := p.prepare(t, a, id); err != nil {
			t.Fatal(err)
		}
	}
	wantCode(t, "third migration of one peer", p.prepare(t, a, "a3"), codes.ResourceExhausted)
	if st := p.dest.Status("a3").State; st != phaul.DestUnknown {
		t.Fatalf("refused migration is %s here", st)
	}
	if err := p.prepare(t, b, "b1"); err != nil {
		t.Fatalf("another peer is refused while the first is at its limit: %v", err)
	}
	// A check-only Prepare reserves nothing and is not limited.
	if _, err := p.unary(peerCtx(a), "Prepare", mustMarshal(t, &migratev1.PrepareRequest{MigrationId: "", Pids: []int32{7}, CheckOnly: true})); err != nil {
		t.Fatalf("check-only prepare at the limit: %v", err)
	}
	// A finished migration frees its slot.
	if _, err := p.unary(peerCtx(a), "Abort", mustMarshal(t, &migratev1.AbortRequest{MigrationId: "a1"})); err != nil {
		t.Fatal(err)
	}
	if err := p.prepare(t, a, "a3"); err != nil {
		t.Fatalf("prepare after a slot was freed: %v", err)
	}
}

func TestPeerAPIRefusesBadInput(t *testing.T) {
	p := newPeerAPI(t)
	defer p.dest.Close()
	ctx := peerCtx("10.0.0.1")
	if err := p.prepare(t, "10.0.0.1", "m1"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"../../escaped", "../m2/x", "/etc/passwd", "..", ".", ".hidden", "a/b", "a\x00b", ""} {
		err := p.stream(ctx, "SendImages", [][]byte{mustMarshal(t, &migratev1.ImageChunk{MigrationId: "m1", Name: name, Data: []byte("x"), Last: true})})
		if err == nil {
			t.Fatalf("image name %q accepted", name)
		}
		if c := status.Code(err); c != codes.FailedPrecondition && c != codes.InvalidArgument {
			t.Fatalf("image name %q: %v", name, err)
		}
	}
	for _, tc := range []struct {
		what   string
		method string
		req    proto.Message
		want   codes.Code
	}{
		{"restore before any page", "Restore", &migratev1.RestoreRequest{MigrationId: "m1"}, codes.FailedPrecondition},
		{"commit before restore", "Commit", &migratev1.CommitRequest{MigrationId: "m1"}, codes.FailedPrecondition},
		{"restore of an unknown migration", "Restore", &migratev1.RestoreRequest{MigrationId: "nope"}, codes.NotFound},
		{"status of a bad id", "Status", &migratev1.PeerStatusRequest{MigrationId: "../x"}, codes.InvalidArgument},
		{"prepare of a bad id", "Prepare", &migratev1.PrepareRequest{MigrationId: "../x", Pids: []int32{7}}, codes.InvalidArgument},
		{"prepare without pids", "Prepare", &migratev1.PrepareRequest{MigrationId: "m9"}, codes.InvalidArgument},
		{"prepare with a negative pid", "Prepare", &migratev1.PrepareRequest{MigrationId: "m9", Pids: []int32{-1}}, codes.InvalidArgument},
		{"prepare with a relative file", "Prepare", &migratev1.PrepareRequest{MigrationId: "m9", Pids: []int32{7}, Files: []*migratev1.FileRef{{Path: "etc/x"}}}, codes.InvalidArgument},
	} {
		_, err := p.unary(ctx, tc.method, mustMarshal(t, tc.req))
		wantCode(t, tc.what, err, tc.want)
	}
	err := p.stream(ctx, "SendPages", [][]byte{mustMarshal(t, &migratev1.PageBatch{MigrationId: "m1", Kind: 77})})
	wantCode(t, "page batch of an unknown kind", err, codes.InvalidArgument)
	p.checkFiles(t)
	// The agent keeps serving: a complete migration from this peer works.
	if err := p.runStrict(ctx, validMigration(&program{}, "m3", false).bytes()); err != nil {
		t.Fatalf("a valid migration after refused input: %v", err)
	}
}

func TestPeerAPIMessageLimit(t *testing.T) {
	p := newPeerAPI(t)
	defer p.dest.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.MaxRecvMsgSize(4<<20), grpc.ChainUnaryInterceptor(p.guard.Unary()), grpc.ChainStreamInterceptor(p.guard.Stream()))
	migratev1.RegisterPeerServer(s, p.srv)
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(ln) }()
	defer func() { s.Stop(); <-done }()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := migratev1.NewPeerClient(conn)
	ctx := context.Background()
	_, err = c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: "big", Pids: []int32{7}, Cpuinfo: make([]byte, 5<<20)})
	wantCode(t, "5 MiB prepare", err, codes.ResourceExhausted)
	if _, err := c.Prepare(ctx, &migratev1.PrepareRequest{MigrationId: "m1", Pids: []int32{7}}); err != nil {
		t.Fatalf("prepare after an oversized message: %v", err)
	}
	st, err := c.SendPages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = st.Send(&migratev1.PageBatch{MigrationId: "m1", Kind: uint32(pagexfer.BatchPrecopy), Payload: make([]byte, 6<<20), RawLen: 6 << 20})
	_, err = st.CloseAndRecv()
	wantCode(t, "6 MiB page batch", err, codes.ResourceExhausted)
	r, err := c.Status(ctx, &migratev1.PeerStatusRequest{MigrationId: "m1"})
	if err != nil || r.State != phaul.DestPrepared {
		t.Fatalf("status after oversized messages: %v %v", r, err)
	}
}

// TestPeerGuardOwnershipSurvivesRestart: after an agent restart the
// in-memory table is empty, and the journal's record names the owner: another
// peer still may not act on the migration.
func TestPeerGuardOwnershipSurvivesRestart(t *testing.T) {
	p := newPeerAPI(t)
	defer p.dest.Close()
	a, b := "10.0.0.1", "10.0.0.2"
	if err := p.prepare(t, a, "m1"); err != nil {
		t.Fatal(err)
	}
	j, err := phaul.OpenJournal(filepath.Join(p.dir, "journal"))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := j.Get("m1"); err != nil || r.Peer != a {
		t.Fatalf("journal record %+v, %v: want the owner %s", r, err, a)
	}
	p.guard = &PeerGuard{MaxPerPeer: 2, State: p.guard.State, JournaledOwner: func(id string) string {
		if r, err := j.Get(id); err == nil && r.Role == "destination" {
			return r.Peer
		}
		return ""
	}}
	_, err = p.unary(peerCtx(b), "Abort", mustMarshal(t, &migratev1.AbortRequest{MigrationId: "m1"}))
	wantCode(t, "abort by another peer after a restart", err, codes.PermissionDenied)
	if _, err := p.unary(peerCtx(a), "Abort", mustMarshal(t, &migratev1.AbortRequest{MigrationId: "m1", Reason: "test"})); err != nil {
		t.Fatalf("abort by the owner after a restart: %v", err)
	}
}
