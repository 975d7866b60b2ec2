package agent

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// DefaultPeerPort is the Peer API's TCP port.
const DefaultPeerPort = "7446"

// maxMessage bounds every gRPC message between agents (a page batch is at
// most a few MiB).
const maxMessage = 16 << 20

// imageChunk is the size of image file chunks.
const imageChunk = 1 << 20

// PeerDialer dials destination agents.
type PeerDialer struct {
	// TLS configures mutual TLS; nil means plain TCP (--insecure).
	TLS *tls.Config
}

// PeerAddress adds the default port to host when it has none.
func PeerAddress(host string) string {
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	return net.JoinHostPort(host, DefaultPeerPort)
}

// Dial connects to the agent at addr. The connection is lazy: the first
// call reports an unreachable peer.
func (d PeerDialer) Dial(ctx context.Context, addr string) (phaul.Peer, error) {
	addr = PeerAddress(addr)
	creds := insecure.NewCredentials()
	if d.TLS != nil {
		cfg := d.TLS.Clone()
		if host, _, err := net.SplitHostPort(addr); err == nil && cfg.ServerName == "" {
			cfg.ServerName = host
		}
		creds = credentials.NewTLS(cfg)
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		// Page batches are megabytes: large windows and buffers keep the
		// link busy.
		grpc.WithInitialWindowSize(8<<20),
		grpc.WithInitialConnWindowSize(16<<20),
		grpc.WithReadBufferSize(1<<20),
		grpc.WithWriteBufferSize(1<<20),
	)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return &peerClient{conn: conn, c: migratev1.NewPeerClient(conn), addr: addr}, nil
}

type peerClient struct {
	conn *grpc.ClientConn
	c    migratev1.PeerClient
	addr string
}

func (p *peerClient) Close() error { return p.conn.Close() }

func capsFromProto(c *migratev1.Capabilities) phaul.Capabilities {
	if c == nil {
		return phaul.Capabilities{}
	}
	return phaul.Capabilities{
		CRIUVersion: c.CriuVersion, PageServerHeaderSize: int(c.PageServerHeaderSize),
		SoftDirty: c.SoftDirty, LazyPages: c.LazyPages, Hostname: c.Hostname, Kernel: c.Kernel,
	}
}

func capsToProto(c phaul.Capabilities) *migratev1.Capabilities {
	return &migratev1.Capabilities{
		CriuVersion: c.CRIUVersion, PageServerHeaderSize: uint32(c.PageServerHeaderSize),
		SoftDirty: c.SoftDirty, LazyPages: c.LazyPages, Hostname: c.Hostname, Kernel: c.Kernel,
	}
}

func (p *peerClient) Prepare(ctx context.Context, req phaul.PrepareRequest) (phaul.PrepareResult, error) {
	pr := &migratev1.PrepareRequest{
		MigrationId: req.ID, Source: capsToProto(req.Source), Cpuinfo: req.CPUInfo,
		MemoryBytes: req.MemoryBytes, Compression: compressionToProto(req.Compression),
		TcpEstablished: req.TCPEstablished, ShellJob: req.ShellJob, CheckOnly: req.CheckOnly,
	}
	for _, pid := range req.PIDs {
		pr.Pids = append(pr.Pids, int32(pid))
	}
	for _, f := range req.Files {
		pr.Files = append(pr.Files, &migratev1.FileRef{Path: f.Path, Size: f.Size})
	}
	resp, err := p.c.Prepare(ctx, pr, grpc.WaitForReady(false))
	if err != nil {
		return phaul.PrepareResult{}, fromStatus(err)
	}
	return phaul.PrepareResult{OK: resp.Ok, Problems: resp.Problems, Destination: capsFromProto(resp.Destination)}, nil
}

type pageStream struct {
	s    migratev1.Peer_SendPagesClient
	id   string
	kind pagexfer.BatchKind
}

func (p *peerClient) OpenPages(ctx context.Context, id string, kind pagexfer.BatchKind) (phaul.PageStream, error) {
	s, err := p.c.SendPages(ctx)
	if err != nil {
		return nil, fromStatus(err)
	}
	return &pageStream{s: s, id: id, kind: kind}, nil
}

func (ps *pageStream) SendBatch(ctx context.Context, b *pagexfer.Batch) error {
	err := ps.s.Send(&migratev1.PageBatch{
		MigrationId: ps.id, Kind: uint32(b.Kind), Seq: b.Seq, Compression: compressionToProto(b.Compression),
		Payload: b.Payload, RawLen: b.RawLen, Checksum: b.Checksum, Last: b.Last,
	})
	if err == io.EOF {
		// The server ended the stream: its status says why.
		_, err = ps.s.CloseAndRecv()
	}
	return fromStatus(err)
}

func (ps *pageStream) CloseAndWait(ctx context.Context) error {
	_, err := ps.s.CloseAndRecv()
	return fromStatus(err)
}

func (p *peerClient) SendImages(ctx context.Context, id, dir string, files []string) error {
	s, err := p.c.SendImages(ctx)
	if err != nil {
		return fromStatus(err)
	}
	buf := make([]byte, imageChunk)
	for _, name := range files {
		if err := sendImage(s, id, dir, name, buf); err != nil {
			s.CloseSend()
			if err == io.EOF {
				_, err = s.CloseAndRecv()
			}
			return fromStatus(err)
		}
	}
	_, err = s.CloseAndRecv()
	return fromStatus(err)
}

func sendImage(s migratev1.Peer_SendImagesClient, id, dir, name string, buf []byte) error {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	var off uint64
	for {
		n, rerr := io.ReadFull(f, buf)
		if rerr != nil && rerr != io.EOF && rerr != io.ErrUnexpectedEOF {
			return rerr
		}
		last := rerr != nil
		h.Write(buf[:n])
		c := &migratev1.ImageChunk{MigrationId: id, Name: name, Offset: off, Data: buf[:n], Last: last}
		if last {
			c.Sha256 = h.Sum(nil)
		}
		if err := s.Send(c); err != nil {
			return err
		}
		off += uint64(n)
		if last {
			return nil
		}
	}
}

func (p *peerClient) Restore(ctx context.Context, id string) (int, error) {
	r, err := p.c.Restore(ctx, &migratev1.RestoreRequest{MigrationId: id})
	if err != nil {
		return 0, fromStatus(err)
	}
	return int(r.Pid), nil
}

func (p *peerClient) Commit(ctx context.Context, id string) (int, error) {
	r, err := p.c.Commit(ctx, &migratev1.CommitRequest{MigrationId: id})
	if err != nil {
		return 0, fromStatus(err)
	}
	return int(r.Pid), nil
}

func (p *peerClient) Abort(ctx context.Context, id, reason string) error {
	_, err := p.c.Abort(ctx, &migratev1.AbortRequest{MigrationId: id, Reason: reason})
	return fromStatus(err)
}

func (p *peerClient) Status(ctx context.Context, id string) (phaul.PeerState, error) {
	r, err := p.c.Status(ctx, &migratev1.PeerStatusRequest{MigrationId: id})
	if err != nil {
		return phaul.PeerState{}, fromStatus(err)
	}
	return phaul.PeerState{State: r.State, PID: int(r.Pid), Err: r.Error}, nil
}

func compressionToProto(c pagexfer.Compression) migratev1.Compression {
	if c == pagexfer.CompressionZstd {
		return migratev1.Compression_COMPRESSION_ZSTD
	}
	return migratev1.Compression_COMPRESSION_NONE
}

func compressionFromProto(c migratev1.Compression) pagexfer.Compression {
	if c == migratev1.Compression_COMPRESSION_ZSTD {
		return pagexfer.CompressionZstd
	}
	return pagexfer.CompressionNone
}
