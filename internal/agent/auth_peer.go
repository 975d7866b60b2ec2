package agent

import (
	"context"
	"fmt"
	"sync"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
	"github.com/migrated/migrated/pkg/phaul"
)

// PeerGuard enforces per-peer rules on the Peer API, in front of the
// PeerServer:
//
//   - a migration belongs to the peer that prepared it: calls about it
//     (pages, images, restore, commit, abort, status) from another peer
//     identity are refused with PermissionDenied;
//   - a peer may have at most MaxPerPeer migrations in flight here (the
//     destination's own MaxConcurrent bounds all peers together); more
//     Prepares are refused with ResourceExhausted.
//
// The peer identity is PeerIdentity's: the certificate's first SAN with
// mutual TLS, the remote address without. Ownership is kept in memory; after
// an agent restart, a migration recovered from the journal belongs to the
// peer its journal record names (JournaledOwner).
type PeerGuard struct {
	// MaxPerPeer bounds one peer's migrations in flight; 0 means no
	// per-peer bound.
	MaxPerPeer int
	// State returns the destination's state of a migration (one of the
	// phaul.Dest* states).
	State func(id string) string
	// JournaledOwner returns the owner the journal records for a
	// migration this agent does not know from a Prepare since it started
	// (one recovered after a restart); "" if none. Optional.
	JournaledOwner func(id string) string
	Log            hclog.Logger

	mu      sync.Mutex
	owner   map[string]string // migration id -> peer identity
	pending map[string]int    // peer identity -> Prepares under way
}

// ownerPrune is the table size above which finished migrations are
// forgotten on the next Prepare.
const ownerPrune = 1024

func (g *PeerGuard) log() hclog.Logger {
	if g.Log == nil {
		return hclog.NewNullLogger()
	}
	return g.Log
}

func terminal(state string) bool {
	return state == phaul.DestCommitted || state == phaul.DestAborted || state == phaul.DestUnknown
}

// checkOwner refuses a call about id from who when another peer owns it.
func (g *PeerGuard) checkOwner(id, who, method string) error {
	g.mu.Lock()
	o, ok := g.owner[id]
	g.mu.Unlock()
	if !ok && g.JournaledOwner != nil {
		o = g.JournaledOwner(id)
		ok = o != ""
	}
	if ok && o != who {
		g.log().Warn("peer call refused: the migration belongs to another peer", "method", shortMethod(method), "migration_id", id, "peer", who, "owner", o)
		return fmt.Errorf("%w: migration %s belongs to another peer", ErrPermission, id)
	}
	return nil
}

// reserve admits a Prepare of id by who; release must follow.
func (g *PeerGuard) reserve(id, who string) (known bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.owner == nil {
		g.owner, g.pending = map[string]string{}, map[string]int{}
	}
	if o, ok := g.owner[id]; ok {
		if o != who {
			return true, fmt.Errorf("%w: migration %s belongs to another peer", ErrPermission, id)
		}
		return true, nil // a repeated Prepare: idempotent
	}
	active := 0
	for mid, o := range g.owner {
		if o != who && len(g.owner) <= ownerPrune {
			continue
		}
		if terminal(g.State(mid)) {
			delete(g.owner, mid)
		} else if o == who {
			active++
		}
	}
	if g.MaxPerPeer > 0 && active+g.pending[who] >= g.MaxPerPeer {
		return false, fmt.Errorf("%w: peer %s has %d migrations in flight here (at most %d per peer)", phaul.ErrBusy, who, active+g.pending[who], g.MaxPerPeer)
	}
	g.pending[who]++
	return false, nil
}

func (g *PeerGuard) release(id, who string, ok bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.pending[who]--
	if g.pending[who] <= 0 {
		delete(g.pending, who)
	}
	if ok {
		g.owner[id] = who
	}
}

type hasMigrationID interface{ GetMigrationId() string }

// Unary is the interceptor for the Peer API's unary calls.
func (g *PeerGuard) Unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		who := PeerIdentity(ctx)
		if pr, ok := req.(*migratev1.PrepareRequest); ok && !pr.CheckOnly {
			known, err := g.reserve(pr.MigrationId, who)
			if err != nil {
				g.log().Warn("prepare refused", "migration_id", pr.MigrationId, "peer", who, "error", err)
				return nil, toStatus(err)
			}
			if known {
				return h(ctx, req)
			}
			resp, err := h(ctx, req)
			ok := err == nil
			if r, isResp := resp.(*migratev1.PrepareResponse); ok && isResp && !r.Ok {
				ok = false // nothing was reserved on the destination
			}
			g.release(pr.MigrationId, who, ok)
			return resp, err
		}
		if m, ok := req.(hasMigrationID); ok {
			if err := g.checkOwner(m.GetMigrationId(), who, info.FullMethod); err != nil {
				return nil, toStatus(err)
			}
		}
		return h(ctx, req)
	}
}

// Stream is the interceptor for the Peer API's streams: every received
// message is checked.
func (g *PeerGuard) Stream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, &guardedStream{ServerStream: ss, g: g, who: PeerIdentity(ss.Context()), method: info.FullMethod})
	}
}

type guardedStream struct {
	grpc.ServerStream
	g      *PeerGuard
	who    string
	method string
}

func (s *guardedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if mm, ok := m.(hasMigrationID); ok {
		if err := s.g.checkOwner(mm.GetMigrationId(), s.who, s.method); err != nil {
			return toStatus(err)
		}
	}
	return nil
}
