package criurpc

import (
	"context"
	"os"
)

// Stage names a point in a CRIU operation at which CRIU notifies the client
// and waits for its answer. The values are CRIU's action-script names.
type Stage string

// The stages CRIU notifies about. Dump-side stages come from dump and
// pre-dump requests, restore-side ones from restore requests.
const (
	// StagePreDump: before CRIU freezes the tree (dump and pre-dump).
	StagePreDump Stage = "pre-dump"
	// StagePostDump: the tree is dumped and still frozen. An error
	// answer makes CRIU fail the dump and resume the tree instead of
	// killing it or leaving it stopped.
	StagePostDump Stage = "post-dump"
	// StagePreRestore: before CRIU starts restoring.
	StagePreRestore Stage = "pre-restore"
	// StagePostRestore: the tree is restored but not yet resumed;
	// Notification.PID is the root task.
	StagePostRestore Stage = "post-restore"
	// StageNetworkLock: CRIU locked the tree's network (dump) or is about
	// to (restore).
	StageNetworkLock Stage = "network-lock"
	// StageNetworkUnlock: CRIU is unlocking the network.
	StageNetworkUnlock Stage = "network-unlock"
	// StageSetupNamespaces: the root task's namespaces exist;
	// Notification.PID is the root task (for example to move veths in).
	StageSetupNamespaces Stage = "setup-namespaces"
	// StagePostSetupNamespaces: namespaces are set up.
	StagePostSetupNamespaces Stage = "post-setup-namespaces"
	// StagePreResume: the restored tree is about to run.
	StagePreResume Stage = "pre-resume"
	// StagePostResume: the restored tree runs (or is left stopped).
	StagePostResume Stage = "post-resume"
	// StageStatusReady: a server CRIU started (the lazy-pages page server
	// of a lazy dump) is ready for connections.
	StageStatusReady Stage = "status-ready"
	// StageOrphanPtsMaster: CRIU restored a pty whose master end no task
	// holds; Notification.File is that master, and the Notifier owns it.
	StageOrphanPtsMaster Stage = "orphan-pts-master"
	// StagePreStream: before CRIU connects to an image streamer.
	StagePreStream Stage = "pre-stream"
	// StageQueryExtFiles: CRIU asks for external files; answered with
	// success and no files.
	StageQueryExtFiles Stage = "query-ext-files"
)

// Notification is one notification from CRIU.
type Notification struct {
	Stage Stage
	// PID is the root task's PID for StagePostRestore and
	// StageSetupNamespaces, 0 otherwise.
	PID int
	// File is the fd CRIU passed along (the pty master of
	// StageOrphanPtsMaster), nil otherwise. The Notifier owns it and must
	// close it; it is closed for the Notifier when Notify returns an error.
	File *os.File
	// CRIUPID is the PID of the CRIU process that sent the notification.
	CRIUPID int
}

// Notifier receives CRIU's notifications during an operation. CRIU waits
// while Notify runs. Returning nil lets CRIU go on; returning an error makes
// CRIU fail the operation (after StagePostDump: resume the frozen tree), and
// the operation's error then wraps both ErrNotifyFailed and the returned
// error. ctx is the operation's context.
type Notifier interface {
	Notify(ctx context.Context, n Notification) error
}

// NotifyFunc adapts a function to the Notifier interface.
type NotifyFunc func(ctx context.Context, n Notification) error

// Notify calls f.
func (f NotifyFunc) Notify(ctx context.Context, n Notification) error { return f(ctx, n) }

// Hooks is a Notifier with one optional function per stage; a nil function
// answers success. Stages without a field here (pre-stream, query-ext-files)
// are answered with success.
type Hooks struct {
	PreDump             func(ctx context.Context) error
	PostDump            func(ctx context.Context) error
	PreRestore          func(ctx context.Context) error
	PostRestore         func(ctx context.Context, pid int) error
	NetworkLock         func(ctx context.Context) error
	NetworkUnlock       func(ctx context.Context) error
	SetupNamespaces     func(ctx context.Context, pid int) error
	PostSetupNamespaces func(ctx context.Context) error
	PreResume           func(ctx context.Context) error
	PostResume          func(ctx context.Context) error
	StatusReady         func(ctx context.Context) error
	// OrphanPtsMaster receives the pty master and owns it. When nil, the
	// master is closed.
	OrphanPtsMaster func(ctx context.Context, master *os.File) error
}

// Notify dispatches n to the matching field of h.
func (h *Hooks) Notify(ctx context.Context, n Notification) error {
	call := func(f func(context.Context) error) error {
		if f == nil {
			return nil
		}
		return f(ctx)
	}
	switch n.Stage {
	case StagePreDump:
		return call(h.PreDump)
	case StagePostDump:
		return call(h.PostDump)
	case StagePreRestore:
		return call(h.PreRestore)
	case StagePostRestore:
		if h.PostRestore != nil {
			return h.PostRestore(ctx, n.PID)
		}
	case StageNetworkLock:
		return call(h.NetworkLock)
	case StageNetworkUnlock:
		return call(h.NetworkUnlock)
	case StageSetupNamespaces:
		if h.SetupNamespaces != nil {
			return h.SetupNamespaces(ctx, n.PID)
		}
	case StagePostSetupNamespaces:
		return call(h.PostSetupNamespaces)
	case StagePreResume:
		return call(h.PreResume)
	case StagePostResume:
		return call(h.PostResume)
	case StageStatusReady:
		return call(h.StatusReady)
	case StageOrphanPtsMaster:
		if h.OrphanPtsMaster != nil {
			return h.OrphanPtsMaster(ctx, n.File)
		}
		if n.File != nil {
			return n.File.Close()
		}
	}
	return nil
}
