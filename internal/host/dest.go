package host

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// Dest is the destination host for the engine.
type Dest struct {
	criu     *criurpc.Client
	workRoot string
	procRoot string
	log      hclog.Logger
	// StoreBudget bounds each migration's page store in memory; beyond it
	// pages spill to a file in the work directory.
	StoreBudget int64
}

// NewDest returns the destination side over criu, with work directories
// under workRoot.
func NewDest(criu *criurpc.Client, workRoot string, log hclog.Logger) *Dest {
	return &Dest{criu: criu, workRoot: workRoot, procRoot: "/proc", log: log, StoreBudget: 1 << 30}
}

// Capabilities probes CRIU.
func (d *Dest) Capabilities(ctx context.Context) (phaul.Capabilities, error) {
	return probe(ctx, d.criu)
}

// CheckCPU runs `criu cpuinfo check` on the source's cpuinfo image.
func (d *Dest) CheckCPU(ctx context.Context, cpuinfo []byte) error {
	if err := os.MkdirAll(d.workRoot, 0o700); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(d.workRoot, "cpuinfo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "cpuinfo.img"), cpuinfo, 0o600); err != nil {
		return err
	}
	return d.criu.CPUInfoCheck(ctx, criurpc.CPUInfoOptions{ImagesDir: dir})
}

// PIDsInUse returns the pids that exist on this host.
func (d *Dest) PIDsInUse(pids []int) []int {
	var used []int
	for _, p := range pids {
		if _, err := os.Stat(filepath.Join(d.procRoot, strconv.Itoa(p))); err == nil {
			used = append(used, p)
		}
	}
	return used
}

// FileProblems reports files missing on this host or of another size.
func (d *Dest) FileProblems(files []phaul.FileRef) []string {
	var out []string
	for _, f := range files {
		fi, err := os.Stat(f.Path)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("file %s the process holds open is missing on the destination", f.Path))
		case !fi.Mode().IsRegular():
			out = append(out, fmt.Sprintf("%s is not a regular file on the destination", f.Path))
		case fi.Size() != f.Size:
			// The source still writes to the file; CRIU checks the size
			// against the dump, which shared storage satisfies.
			d.log.Debug("open file differs in size", "path", f.Path, "source", f.Size, "destination", fi.Size())
		}
	}
	return out
}

// WorkDir creates the migration's work directory.
func (d *Dest) WorkDir(id string) (string, error) {
	dir := filepath.Join(d.workRoot, id)
	return dir, os.MkdirAll(dir, 0o700)
}

// receiver runs the page store and, from the first final batch on, a
// local CRIU page server fed by the replay.
type receiver struct {
	d       *Dest
	images  string
	hdrSize int
	store   *pagexfer.Store
	recv    *pagexfer.Receiver

	mu      sync.Mutex
	ps      *criurpc.PageServer
	psConn  net.Conn
	started bool
}

// NewReceiver creates the migration's page store.
func (d *Dest) NewReceiver(ctx context.Context, id, workDir string, hdrSize int) (phaul.PageReceiver, error) {
	storeDir := filepath.Join(workDir, "store")
	if err := os.MkdirAll(storeDir, 0o700); err != nil {
		return nil, err
	}
	store, err := pagexfer.NewStore(storeDir, d.StoreBudget)
	if err != nil {
		return nil, err
	}
	recv, err := pagexfer.NewReceiver(store, pagexfer.ReceiverOptions{Logger: d.log.Named("pagexfer").With("migration_id", id)})
	if err != nil {
		store.Close()
		return nil, err
	}
	return &receiver{d: d, images: filepath.Join(workDir, "images"), hdrSize: hdrSize, store: store, recv: recv}, nil
}

func (r *receiver) startPageServer(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return nil
	}
	criuEnd, conn, err := pageSocket()
	if err != nil {
		return err
	}
	// The page server outlives this call: it must not be bound to the
	// batch's context.
	ps, err := r.d.criu.StartPageServer(context.WithoutCancel(ctx), criurpc.PageServerOptions{ImagesDir: r.images, Conn: criuEnd})
	criuEnd.Close()
	if err != nil {
		conn.Close()
		return fmt.Errorf("starting CRIU's page server: %w", err)
	}
	if err := r.recv.StartReplay(context.WithoutCancel(ctx), conn, r.hdrSize); err != nil {
		conn.Close()
		ps.Kill()
		return err
	}
	r.ps, r.psConn, r.started = ps, conn, true
	return nil
}

func (r *receiver) HandleBatch(ctx context.Context, b *pagexfer.Batch) error {
	if b.Kind == pagexfer.BatchFinal {
		if err := r.startPageServer(ctx); err != nil {
			return err
		}
	}
	return r.recv.HandleBatch(ctx, b)
}

func (r *receiver) FinishFinal(ctx context.Context) error {
	r.mu.Lock()
	ps, conn, started := r.ps, r.psConn, r.started
	r.mu.Unlock()
	if !started {
		return errors.New("no final page stream was received")
	}
	if err := r.recv.Finish(ctx); err != nil {
		return err
	}
	conn.Close()
	// CRIU's page server acknowledges CLOSE before it flushes its files:
	// its exit means the images are complete.
	return ps.Wait(ctx)
}

func (r *receiver) Close() error {
	r.mu.Lock()
	ps, conn := r.ps, r.psConn
	r.ps, r.psConn = nil, nil
	r.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	if ps != nil {
		ps.Kill()
	}
	r.recv.Close()
	err := r.store.Close()
	freeMemory()
	return err
}

var freeing atomic.Bool

// freeMemory hands the memory of a closed page store (up to StoreBudget)
// back to the kernel now rather than at the runtime's leisure: the next
// collection would only come when the heap doubled again. A forced
// collection takes tens of milliseconds with a large heap, which the
// migration's downtime does not wait for: it runs in the background, one
// at a time, and ends by itself.
func freeMemory() {
	if !freeing.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer freeing.Store(false)
		debug.FreeOSMemory()
	}()
}

// Restore restores the tree left stopped.
func (d *Dest) Restore(ctx context.Context, id, imagesDir string, o phaul.RestoreOptions) (phaul.RestoredTree, error) {
	res, err := d.criu.Restore(ctx, criurpc.RestoreOptions{
		ImagesDir: imagesDir, WorkDir: filepath.Dir(imagesDir), LeaveStopped: true,
		TCPEstablished: o.TCPEstablished, NetworkLock: networkLock(o.TCPEstablished), ShellJob: o.ShellJob,
	}, nil)
	if err != nil {
		return phaul.RestoredTree{}, err
	}
	t, err := inspect(d.procRoot, res.PID)
	if err != nil {
		pids := []int{res.PID}
		return phaul.RestoredTree{PID: res.PID, PIDs: pids, Identity: identify(d.procRoot, pids)}, nil
	}
	return phaul.RestoredTree{PID: res.PID, PIDs: t.PIDs, Identity: t.Identity}, nil
}

// Resume lets a restored tree run.
func (d *Dest) Resume(t phaul.RestoredTree) error {
	return signalTree(d.procRoot, t.PIDs, t.Identity, unix.SIGCONT)
}

// Kill removes a restored, stopped tree.
func (d *Dest) Kill(t phaul.RestoredTree) error {
	return signalTree(d.procRoot, t.PIDs, t.Identity, unix.SIGKILL)
}

// Alive reports whether the tree's root exists and is the restored
// process: the recorded identity, or, while it is unknown (the agent
// stopped during the restore), a stopped task as CRIU leaves it.
func (d *Dest) Alive(t phaul.RestoredTree) bool {
	if !alive(d.procRoot, t.PID, t.Identity) {
		return false
	}
	if t.Identity.Known() {
		return true
	}
	st, err := procState(d.procRoot, t.PID)
	return err == nil && (st == 'T' || st == 't')
}

// Cleanup removes the migration's work directory.
func (d *Dest) Cleanup(id string) {
	if phaul.ValidID(id) {
		_ = os.RemoveAll(filepath.Join(d.workRoot, id))
	}
}
