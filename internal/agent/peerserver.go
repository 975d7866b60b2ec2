package agent

import (
	"context"
	"fmt"
	"io"

	"github.com/hashicorp/go-hclog"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// PeerServer serves the Peer API over a phaul.Destination.
type PeerServer struct {
	migratev1.UnimplementedPeerServer
	Dest *phaul.Destination
	Log  hclog.Logger
}

// Limits on what a peer may send in one message.
const (
	maxPIDs  = 65536
	maxFiles = 65536
	maxPath  = 4096
)

func (s *PeerServer) Prepare(ctx context.Context, r *migratev1.PrepareRequest) (*migratev1.PrepareResponse, error) {
	if len(r.Pids) == 0 || len(r.Pids) > maxPIDs || len(r.Files) > maxFiles {
		return nil, toStatus(fmt.Errorf("%w: %d pids, %d files", ErrInvalid, len(r.Pids), len(r.Files)))
	}
	req := phaul.PrepareRequest{
		ID: r.MigrationId, Source: capsFromProto(r.Source), CPUInfo: r.Cpuinfo, MemoryBytes: r.MemoryBytes,
		Compression: compressionFromProto(r.Compression), TCPEstablished: r.TcpEstablished, ShellJob: r.ShellJob,
		CheckOnly: r.CheckOnly, Peer: PeerIdentity(ctx),
	}
	for _, pid := range r.Pids {
		if pid <= 0 {
			return nil, toStatus(fmt.Errorf("%w: pid %d", ErrInvalid, pid))
		}
		req.PIDs = append(req.PIDs, int(pid))
	}
	for _, f := range r.Files {
		if len(f.Path) == 0 || len(f.Path) > maxPath || f.Path[0] != '/' {
			return nil, toStatus(fmt.Errorf("%w: file path %q", ErrInvalid, f.Path))
		}
		req.Files = append(req.Files, phaul.FileRef{Path: f.Path, Size: f.Size})
	}
	res, err := s.Dest.Prepare(ctx, req)
	if err != nil {
		s.Log.Warn("prepare refused", "migration_id", r.MigrationId, "error", err)
		return nil, toStatus(err)
	}
	return &migratev1.PrepareResponse{Ok: res.OK, Problems: res.Problems, Destination: capsToProto(res.Destination)}, nil
}

func (s *PeerServer) SendPages(stream migratev1.Peer_SendPagesServer) error {
	ctx := stream.Context()
	var id string
	var n uint64
	for {
		b, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&migratev1.SendPagesResponse{Batches: n})
		}
		if err != nil {
			return err
		}
		if id == "" {
			id = b.MigrationId
		} else if b.MigrationId != id {
			return toStatus(fmt.Errorf("%w: batch for migration %q in a stream of %q", ErrInvalid, b.MigrationId, id))
		}
		kind := pagexfer.BatchKind(b.Kind)
		if kind != pagexfer.BatchPrecopy && kind != pagexfer.BatchFinal {
			return toStatus(fmt.Errorf("%w: batch kind %d", ErrInvalid, b.Kind))
		}
		batch := &pagexfer.Batch{
			Kind: kind, Seq: b.Seq, Compression: compressionFromProto(b.Compression),
			Payload: b.Payload, RawLen: b.RawLen, Checksum: b.Checksum, Last: b.Last,
		}
		if err := s.Dest.HandleBatch(ctx, id, batch); err != nil {
			s.Log.Warn("page batch refused", "migration_id", id, "seq", b.Seq, "error", err)
			return toStatus(err)
		}
		n++
	}
}

func (s *PeerServer) SendImages(stream migratev1.Peer_SendImagesServer) error {
	ctx := stream.Context()
	var id string
	var files uint32
	var bytes uint64
	for {
		c, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&migratev1.SendImagesResponse{Files: files, Bytes: bytes})
		}
		if err != nil {
			return err
		}
		if id == "" {
			id = c.MigrationId
		} else if c.MigrationId != id {
			return toStatus(fmt.Errorf("%w: image for migration %q in a stream of %q", ErrInvalid, c.MigrationId, id))
		}
		if err := s.Dest.ImageChunk(ctx, id, c.Name, c.Offset, c.Data, c.Last, c.Sha256); err != nil {
			s.Log.Warn("image refused", "migration_id", id, "name", c.Name, "error", err)
			return toStatus(err)
		}
		bytes += uint64(len(c.Data))
		if c.Last {
			files++
		}
	}
}

func (s *PeerServer) Restore(ctx context.Context, r *migratev1.RestoreRequest) (*migratev1.RestoreResponse, error) {
	t, err := s.Dest.Restore(ctx, r.MigrationId)
	if err != nil {
		return nil, toStatus(err)
	}
	return &migratev1.RestoreResponse{Pid: int32(t.PID)}, nil
}

func (s *PeerServer) Commit(ctx context.Context, r *migratev1.CommitRequest) (*migratev1.CommitResponse, error) {
	pid, err := s.Dest.Commit(ctx, r.MigrationId)
	if err != nil {
		return nil, toStatus(err)
	}
	return &migratev1.CommitResponse{Pid: int32(pid)}, nil
}

func (s *PeerServer) Abort(ctx context.Context, r *migratev1.AbortRequest) (*migratev1.AbortResponse, error) {
	if err := s.Dest.Abort(ctx, r.MigrationId, r.Reason); err != nil {
		return nil, toStatus(err)
	}
	return &migratev1.AbortResponse{}, nil
}

func (s *PeerServer) Status(ctx context.Context, r *migratev1.PeerStatusRequest) (*migratev1.PeerStatusResponse, error) {
	if !phaul.ValidID(r.MigrationId) {
		return nil, toStatus(fmt.Errorf("%w: %q", phaul.ErrBadID, r.MigrationId))
	}
	st := s.Dest.Status(r.MigrationId)
	return &migratev1.PeerStatusResponse{State: st.State, Pid: int32(st.PID), Error: st.Err}, nil
}
