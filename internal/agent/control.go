package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/hashicorp/go-hclog"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/internal/buildinfo"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// ControlServer serves the Control API over a phaul.Source.
type ControlServer struct {
	migratev1.UnimplementedControlServer
	Source  *phaul.Source
	Dest    *phaul.Destination
	Journal *phaul.Journal
	Local   phaul.Local
	Log     hclog.Logger
	// Insecure is true when the Peer API runs without TLS.
	Insecure bool
}

func moveRequest(r *migratev1.MoveRequest) (phaul.MoveRequest, error) {
	req := phaul.MoveRequest{
		ID: r.MigrationId, PID: int(r.Pid), Destination: r.Destination,
		DowntimeTarget: time.Duration(r.DowntimeTargetMs) * time.Millisecond,
		MaxRounds:      int(r.MaxRounds), BandwidthLimit: int64(r.BandwidthLimit),
		TCPEstablished: r.TcpEstablished, ShellJob: r.ShellJob,
	}
	switch r.Mode {
	case migratev1.Mode_MODE_UNSPECIFIED, migratev1.Mode_MODE_PRECOPY:
		req.Mode = phaul.ModePrecopy
	case migratev1.Mode_MODE_STOPCOPY:
		req.Mode = phaul.ModeStopCopy
	default:
		return req, fmt.Errorf("%w: mode %d", ErrInvalid, r.Mode)
	}
	switch r.Compression {
	case migratev1.Compression_COMPRESSION_UNSPECIFIED, migratev1.Compression_COMPRESSION_NONE:
		req.Compression = pagexfer.CompressionNone
	case migratev1.Compression_COMPRESSION_ZSTD:
		req.Compression = pagexfer.CompressionZstd
	default:
		return req, fmt.Errorf("%w: compression %d", ErrInvalid, r.Compression)
	}
	if r.Pid <= 0 {
		return req, fmt.Errorf("%w: pid %d", ErrInvalid, r.Pid)
	}
	if r.Destination == "" {
		return req, fmt.Errorf("%w: no destination", ErrInvalid)
	}
	if r.MaxRounds > 1000 {
		return req, fmt.Errorf("%w: max rounds %d (at most 1000)", ErrInvalid, r.MaxRounds)
	}
	return req, nil
}

func (s *ControlServer) Move(r *migratev1.MoveRequest, stream migratev1.Control_MoveServer) error {
	req, err := moveRequest(r)
	if err != nil {
		return toStatus(err)
	}
	m, err := s.Source.Move(req)
	if err != nil {
		return toStatus(err)
	}
	s.Log.Info("move started", "migration_id", m.ID, "pid", req.PID, "destination", req.Destination, "mode", req.Mode)
	return s.watch(stream.Context(), m, stream.Send)
}

func (s *ControlServer) WatchMigration(r *migratev1.GetMigrationRequest, stream migratev1.Control_WatchMigrationServer) error {
	m, ok := s.Source.Get(r.MigrationId)
	if !ok {
		return toStatus(fmt.Errorf("%w: %s (only migrations this agent runs as the source can be watched)", phaul.ErrUnknownMigration, r.MigrationId))
	}
	return s.watch(stream.Context(), m, stream.Send)
}

func (s *ControlServer) watch(ctx context.Context, m *phaul.Migration, send func(*migratev1.MoveEvent) error) error {
	err := m.Watch(ctx, func(e phaul.Event) error { return send(eventToProto(e)) })
	if errors.Is(err, context.Canceled) {
		// The caller went away; the migration goes on.
		return nil
	}
	return err
}

func phaseToProto(p phaul.Phase) migratev1.Phase {
	return migratev1.Phase(p)
}

func eventToProto(e phaul.Event) *migratev1.MoveEvent {
	ev := &migratev1.MoveEvent{
		MigrationId: e.ID, Phase: phaseToProto(e.Phase), Message: e.Message, ElapsedMs: e.Elapsed.Milliseconds(),
		Round: uint32(e.Round), PagesScanned: e.PagesScanned, PagesSent: e.PagesSent, PagesReferenced: e.PagesReferenced,
		RawBytes: e.RawBytes, WireBytes: e.WireBytes, RateBytesPerSec: e.Rate, DirtyBytesPerSec: e.DirtyRate,
		EstimatedDowntimeMs: e.EstimatedDowntime.Milliseconds(),
	}
	if e.Outcome != nil {
		ev.Outcome = outcomeToProto(e.Outcome)
	}
	return ev
}

func outcomeToProto(o *phaul.Outcome) *migratev1.Outcome {
	out := &migratev1.Outcome{
		Moved: o.Moved, DestPid: int32(o.DestPID), DowntimeMs: o.Downtime.Milliseconds(), TotalMs: o.Total.Milliseconds(),
		Rounds: uint32(o.Rounds), WireBytes: o.WireBytes, RawBytes: o.RawBytes, ProcessLocation: o.ProcessLocation,
		Advice: o.Advice, PrecopyStopReason: o.PrecopyStopReason,
	}
	if o.Err != nil {
		out.Error = o.Err.Error()
		out.FailedPhase = o.FailedPhase.String()
	}
	return out
}

func (s *ControlServer) Check(ctx context.Context, r *migratev1.CheckRequest) (*migratev1.CheckResponse, error) {
	if r.Pid <= 0 || r.Destination == "" {
		return nil, toStatus(fmt.Errorf("%w: pid and destination are required", ErrInvalid))
	}
	res, notes, err := s.Source.Check(ctx, phaul.MoveRequest{PID: int(r.Pid), Destination: r.Destination, TCPEstablished: r.TcpEstablished, ShellJob: r.ShellJob})
	if err != nil {
		if errors.Is(err, phaul.ErrNoProcess) {
			return &migratev1.CheckResponse{Ok: false, Problems: []string{err.Error()}, Notes: notes}, nil
		}
		return &migratev1.CheckResponse{Ok: false, Problems: []string{err.Error()}, Notes: notes}, nil
	}
	return &migratev1.CheckResponse{Ok: res.OK, Problems: res.Problems, Notes: append(notes, "destination CRIU "+res.Destination.CRIUVersion)}, nil
}

func (s *ControlServer) migrationOf(m *phaul.Migration) *migratev1.Migration {
	pm := &migratev1.Migration{
		MigrationId: m.ID, Role: "source", Pid: int32(m.Req.PID), Peer: m.Req.Destination,
		Phase: phaseToProto(m.Phase()), State: m.State(), StartedUnixMs: m.Started.UnixMilli(),
	}
	if e, ok := m.LastEvent(); ok {
		pm.LastEvent = eventToProto(e)
	}
	if o := m.Outcome(); o != nil {
		pm.Outcome = outcomeToProto(o)
		pm.EndedUnixMs = m.Started.Add(o.Total).UnixMilli()
	}
	return pm
}

func recordToProto(r phaul.Record) *migratev1.Migration {
	return &migratev1.Migration{
		MigrationId: r.ID, Role: r.Role, Pid: int32(r.PID), Peer: r.Peer, State: r.State,
		StartedUnixMs: r.Started.UnixMilli(), EndedUnixMs: r.Updated.UnixMilli(),
		Outcome: &migratev1.Outcome{DestPid: int32(r.DestPID), Error: r.Error},
	}
}

func (s *ControlServer) ListMigrations(ctx context.Context, _ *migratev1.ListMigrationsRequest) (*migratev1.ListMigrationsResponse, error) {
	seen := map[string]bool{}
	var out []*migratev1.Migration
	for _, m := range s.Source.List() {
		seen[m.ID] = true
		out = append(out, s.migrationOf(m))
	}
	recs, _ := s.Journal.List()
	for _, r := range recs {
		if !seen[r.ID] {
			out = append(out, recordToProto(r))
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].StartedUnixMs > out[b].StartedUnixMs })
	return &migratev1.ListMigrationsResponse{Migrations: out}, nil
}

func (s *ControlServer) GetMigration(ctx context.Context, r *migratev1.GetMigrationRequest) (*migratev1.Migration, error) {
	if m, ok := s.Source.Get(r.MigrationId); ok {
		return s.migrationOf(m), nil
	}
	rec, err := s.Journal.Get(r.MigrationId)
	if err != nil {
		return nil, toStatus(err)
	}
	return recordToProto(rec), nil
}

func (s *ControlServer) CancelMigration(ctx context.Context, r *migratev1.CancelMigrationRequest) (*migratev1.CancelMigrationResponse, error) {
	if err := s.Source.Cancel(r.MigrationId); err != nil {
		return nil, toStatus(err)
	}
	m, _ := s.Source.Get(r.MigrationId)
	select {
	case <-m.Done():
	case <-ctx.Done():
		return nil, toStatus(ctx.Err())
	}
	o := m.Outcome()
	if o.Moved {
		return &migratev1.CancelMigrationResponse{Message: fmt.Sprintf("too late: the migration committed; pid %d runs on the destination", o.DestPID)}, nil
	}
	return &migratev1.CancelMigrationResponse{Message: fmt.Sprintf("cancelled: pid %d runs on the source; the destination holds nothing", m.Req.PID)}, nil
}

func (s *ControlServer) Version(ctx context.Context, _ *migratev1.VersionRequest) (*migratev1.VersionResponse, error) {
	host, _ := os.Hostname()
	resp := &migratev1.VersionResponse{Version: buildinfo.String(), Hostname: host, PeerTransport: "mtls"}
	if s.Insecure {
		resp.PeerTransport = "insecure"
		resp.Warnings = append(resp.Warnings, "the peer API runs without TLS (--insecure): anyone who reaches its port can restore code on this host as root")
	}
	caps, err := s.Local.Capabilities(ctx)
	if err != nil {
		resp.Warnings = append(resp.Warnings, "CRIU unusable: "+err.Error())
	} else {
		resp.CriuVersion, resp.PageServerHeaderSize = caps.CRIUVersion, uint32(caps.PageServerHeaderSize)
		resp.SoftDirty, resp.LazyPages = caps.SoftDirty, caps.LazyPages
	}
	return resp, nil
}
