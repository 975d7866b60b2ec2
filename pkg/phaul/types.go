package phaul

import (
	"context"
	"time"

	"github.com/migrated/migrated/pkg/pagexfer"
)

// Mode selects how memory is moved.
type Mode int

const (
	// ModePrecopy copies memory while the process runs, then freezes it for
	// a final dump that sends only what changed.
	ModePrecopy Mode = iota
	// ModeStopCopy freezes the process and copies everything at once.
	ModeStopCopy
)

func (m Mode) String() string {
	switch m {
	case ModePrecopy:
		return "precopy"
	case ModeStopCopy:
		return "stopcopy"
	}
	return "unknown"
}

// Phase is a step of a migration.
type Phase int

// The phases, in order. PhaseDone and PhaseFailed are terminal.
const (
	PhasePrepare Phase = iota + 1
	PhasePrecopy
	PhaseDump
	PhaseTransfer
	PhaseRestore
	PhaseCommit
	PhaseDone
	PhaseFailed
)

var phaseNames = map[Phase]string{
	PhasePrepare:  "prepare",
	PhasePrecopy:  "precopy",
	PhaseDump:     "dump",
	PhaseTransfer: "transfer",
	PhaseRestore:  "restore",
	PhaseCommit:   "commit",
	PhaseDone:     "done",
	PhaseFailed:   "failed",
}

func (p Phase) String() string {
	if s, ok := phaseNames[p]; ok {
		return s
	}
	return "unknown"
}

// Capabilities describe one host's CRIU and kernel, as exchanged in
// Prepare.
type Capabilities struct {
	CRIUVersion          string
	PageServerHeaderSize int
	SoftDirty            bool
	LazyPages            bool
	Hostname             string
	Kernel               string
}

// FileRef is a regular file the tree holds open.
type FileRef struct {
	Path string
	Size int64
}

// Tree is a process tree on the source host.
type Tree struct {
	// PIDs of every task (not threads), root first, as the source host
	// sees them.
	PIDs []int
	// Files are the regular files the tree holds open.
	Files []FileRef
	// MemoryBytes is the tree's private resident memory.
	MemoryBytes uint64
	// Identity tells these processes from later ones that reuse their
	// PIDs; the zero value identifies nothing.
	Identity Identity
}

// Identity tells the tasks of a tree from processes that later reuse their
// PIDs (after they exit, or after a reboot): the host's boot id and each
// task's start time (clock ticks after boot, from /proc/PID/stat).
type Identity struct {
	BootID string   `json:"boot_id,omitempty"`
	Starts []uint64 `json:"starts,omitempty"` // parallel to the tree's PIDs
}

// Known reports whether the identity has anything to check.
func (i Identity) Known() bool { return i.BootID != "" && len(i.Starts) > 0 }

// Root returns the tree's root PID.
func (t Tree) Root() int { return t.PIDs[0] }

// MoveRequest asks the source engine to move a process tree.
type MoveRequest struct {
	ID             string
	PID            int
	Destination    string
	Mode           Mode
	DowntimeTarget time.Duration
	MaxRounds      int
	BandwidthLimit int64
	Compression    pagexfer.Compression
	TCPEstablished bool
	ShellJob       bool
}

// PrepareRequest is what the source tells the destination before anything
// happens.
type PrepareRequest struct {
	ID             string
	Source         Capabilities
	PIDs           []int
	Files          []FileRef
	CPUInfo        []byte
	MemoryBytes    uint64
	Compression    pagexfer.Compression
	TCPEstablished bool
	ShellJob       bool
	CheckOnly      bool
	// Peer is the source agent as the destination's transport
	// authenticated it; the destination journals it as the migration's
	// owner.
	Peer string
}

// PrepareResult is the destination's answer to Prepare.
type PrepareResult struct {
	OK          bool
	Problems    []string
	Destination Capabilities
}

// PageStream is one stream of page batches to the destination.
type PageStream interface {
	pagexfer.BatchSink
	// CloseAndWait ends the stream and waits until the destination has
	// consumed every batch.
	CloseAndWait(ctx context.Context) error
}

// Peer is the destination agent as the source engine sees it. Every call is
// idempotent by migration id.
type Peer interface {
	// Prepare checks that the destination can take the tree and reserves a
	// work area unless req.CheckOnly. A result with OK false lists the
	// problems; an error means the peer could not be asked.
	Prepare(ctx context.Context, req PrepareRequest) (PrepareResult, error)
	// OpenPages opens a stream of batches of the given kind.
	OpenPages(ctx context.Context, id string, kind pagexfer.BatchKind) (PageStream, error)
	// SendImages sends the named files of dir.
	SendImages(ctx context.Context, id, dir string, files []string) error
	// Restore restores the tree on the destination, left stopped, and
	// returns its root PID there.
	Restore(ctx context.Context, id string) (int, error)
	// Commit resumes the restored tree. Only sent after the source's copy
	// was removed.
	Commit(ctx context.Context, id string) (int, error)
	// Abort discards everything of the migration on the destination.
	Abort(ctx context.Context, id, reason string) error
	// Status reports the destination's state of the migration.
	Status(ctx context.Context, id string) (PeerState, error)
	// Close releases the connection.
	Close() error
}

// PeerState is the destination's view of a migration.
type PeerState struct {
	State string // see the Dest* constants
	PID   int
	Err   string
}

// Destination states reported by Peer.Status.
const (
	DestUnknown   = "unknown"
	DestPrepared  = "prepared"
	DestReceiving = "receiving"
	DestRestoring = "restoring"
	DestRestored  = "restored"
	DestCommitted = "committed"
	DestAborted   = "aborted"
)

// RoundStats reports one pre-copy round.
type RoundStats = pagexfer.RoundStats

// Precopy runs content-hash or soft-dirty pre-copy rounds on a tree.
type Precopy interface {
	// Round sends what changed since the previous round into s.
	Round(ctx context.Context, s PageStream) (RoundStats, error)
	// Close releases the pre-copy state.
	Close() error
}

// DumpResult is the outcome of the final dump.
type DumpResult struct {
	// ImagesDir holds the non-memory images; Files names them.
	ImagesDir string
	Files     []string
	// FrozenAt is when the tree was frozen.
	FrozenAt time.Time
	// Counters of the final page stream.
	Pages pagexfer.Counters
	// FreezeDuration is CRIU's own measure of the frozen time so far.
	FreezeDuration time.Duration
}

// DumpRequest asks Local for the final dump.
type DumpRequest struct {
	ID             string
	Tree           Tree
	Pages          PageStream
	Compression    pagexfer.Compression
	BandwidthLimit int64
	TCPEstablished bool
	ShellJob       bool
}

// Local is the source host: CRIU and pagexfer on the machine the process
// runs on.
type Local interface {
	// Capabilities probes CRIU and the kernel.
	Capabilities(ctx context.Context) (Capabilities, error)
	// CPUInfo returns `criu cpuinfo dump` output for the destination's check.
	CPUInfo(ctx context.Context) ([]byte, error)
	// Inspect finds the tree rooted at pid. ErrNoProcess if it does not
	// exist.
	Inspect(ctx context.Context, pid int) (Tree, error)
	// Alive reports whether the tree's root still exists (and, when the
	// tree's Identity is known, is the same process).
	Alive(tree Tree) bool
	// NewPrecopy starts pre-copy state for a tree.
	NewPrecopy(ctx context.Context, id string, tree Tree, caps Capabilities, compression pagexfer.Compression, bandwidth int64) (Precopy, error)
	// Dump freezes the tree and dumps it, pages into req.Pages, leaving
	// the tree frozen (stopped) on success. On error the tree runs.
	Dump(ctx context.Context, req DumpRequest) (DumpResult, error)
	// Resume lets a frozen tree run again. Resume and Kill signal only the
	// tasks that match the tree's Identity when it is known.
	Resume(tree Tree) error
	// Kill removes the frozen tree.
	Kill(tree Tree) error
	// Cleanup removes the migration's work files.
	Cleanup(id string)
}

// Event reports progress of a migration.
type Event struct {
	ID                string
	Phase             Phase
	Message           string
	Elapsed           time.Duration
	Round             int
	PagesScanned      uint64
	PagesSent         uint64
	PagesReferenced   uint64
	RawBytes          uint64
	WireBytes         uint64
	Rate              float64 // bytes/s
	DirtyRate         float64 // bytes/s
	EstimatedDowntime time.Duration
	Outcome           *Outcome
}

// Outcome is the end of a migration.
type Outcome struct {
	Moved             bool
	DestPID           int
	Downtime          time.Duration
	Total             time.Duration
	Rounds            int
	WireBytes         uint64
	RawBytes          uint64
	Err               error
	FailedPhase       Phase
	ProcessLocation   string // "source", "destination", "unknown"
	Advice            string
	PrecopyStopReason string
}
