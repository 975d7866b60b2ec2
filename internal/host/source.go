package host

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/phaul"
)

// Source is the source host for the engine.
type Source struct {
	criu     *criurpc.Client
	workRoot string
	procRoot string
	log      hclog.Logger

	mu      sync.Mutex
	xfers   map[string]*xfer // per migration
	hdrSize int
	// netLocks holds the run ids of dumps that left their tree stopped
	// with the network locked (TCPEstablished), by root PID: resuming or
	// removing the tree lifts the lock.
	netLocks map[int]string
}

// NewSource returns the source side over criu, with work directories
// under workRoot.
func NewSource(criu *criurpc.Client, workRoot string, log hclog.Logger) *Source {
	return &Source{criu: criu, workRoot: workRoot, procRoot: "/proc", log: log,
		xfers: map[string]*xfer{}, netLocks: map[int]string{}}
}

// Capabilities probes CRIU. Every migration's preflight probes, so the
// page-server header size the final dump needs is the current CRIU's.
func (s *Source) Capabilities(ctx context.Context) (phaul.Capabilities, error) {
	caps, err := probe(ctx, s.criu)
	if err == nil {
		s.mu.Lock()
		s.hdrSize = caps.PageServerHeaderSize
		s.mu.Unlock()
	}
	return caps, err
}

func probe(ctx context.Context, c *criurpc.Client) (phaul.Capabilities, error) {
	caps, err := c.Probe(ctx)
	if err != nil {
		return phaul.Capabilities{}, err
	}
	host, _ := os.Hostname()
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	return phaul.Capabilities{
		CRIUVersion: caps.Version.String(), PageServerHeaderSize: caps.PageServerHeaderSize,
		SoftDirty: caps.SoftDirty, LazyPages: caps.Features.LazyPages, Hostname: host,
		Kernel: unix.ByteSliceToString(uts.Release[:]),
	}, nil
}

// CPUInfo returns the output of `criu cpuinfo dump`.
func (s *Source) CPUInfo(ctx context.Context) ([]byte, error) {
	dir, err := os.MkdirTemp(s.workRoot, "cpuinfo-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := s.criu.CPUInfoDump(ctx, criurpc.CPUInfoOptions{ImagesDir: dir}); err != nil {
		return nil, err
	}
	return os.ReadFile(filepath.Join(dir, "cpuinfo.img"))
}

// Inspect finds the tree rooted at pid.
func (s *Source) Inspect(ctx context.Context, pid int) (phaul.Tree, error) {
	return inspect(s.procRoot, pid)
}

// Alive reports whether the tree's root exists and is not a zombie.
func (s *Source) Alive(t phaul.Tree) bool { return alive(s.procRoot, t.Root(), t.Identity) }

// xfer is one migration's page transfer: a single Sender for all its
// streams (the destination checks batch sequence numbers across them), fed
// to whichever stream is current.
type xfer struct {
	sw  *switchSink
	snd *pagexfer.Sender
}

// switchSink hands batches to the current stream. The stream is switched
// only between a Flush and the next batch, when the Sender holds nothing.
type switchSink struct {
	mu  sync.Mutex
	cur pagexfer.BatchSink
}

func (w *switchSink) set(s pagexfer.BatchSink) {
	w.mu.Lock()
	w.cur = s
	w.mu.Unlock()
}

func (w *switchSink) SendBatch(ctx context.Context, b *pagexfer.Batch) error {
	w.mu.Lock()
	cur := w.cur
	w.mu.Unlock()
	if cur == nil {
		return errors.New("page batch outside of a stream")
	}
	return cur.SendBatch(ctx, b)
}

func (s *Source) xfer(id string, compression pagexfer.Compression, bandwidth int64) (*xfer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if x, ok := s.xfers[id]; ok {
		return x, nil
	}
	sw := &switchSink{}
	snd, err := pagexfer.NewSender(sw, pagexfer.SenderOptions{
		Compression: compression, BandwidthLimit: bandwidth, Logger: s.log.Named("pagexfer").With("migration_id", id),
	})
	if err != nil {
		return nil, err
	}
	x := &xfer{sw: sw, snd: snd}
	s.xfers[id] = x
	return x, nil
}

type precopy struct {
	sc *pagexfer.Scanner
	x  *xfer
}

// NewPrecopy starts content-hash pre-copy of the tree.
func (s *Source) NewPrecopy(ctx context.Context, id string, t phaul.Tree, caps phaul.Capabilities, compression pagexfer.Compression, bandwidth int64) (phaul.Precopy, error) {
	x, err := s.xfer(id, compression, bandwidth)
	if err != nil {
		return nil, err
	}
	sc := pagexfer.NewScanner(t.PIDs, pagexfer.ScannerOptions{Logger: s.log.Named("precopy").With("migration_id", id)})
	return &precopy{sc: sc, x: x}, nil
}

func (p *precopy) Round(ctx context.Context, st phaul.PageStream) (phaul.RoundStats, error) {
	p.x.sw.set(st)
	defer p.x.sw.set(nil)
	return p.sc.Round(ctx, p.x.snd)
}

func (p *precopy) Close() error { return nil }

// Dump freezes the tree and dumps it with the page stream going through a
// socketpair into req.Pages. On success the tree is left stopped.
func (s *Source) Dump(ctx context.Context, req phaul.DumpRequest) (phaul.DumpResult, error) {
	x, err := s.xfer(req.ID, req.Compression, req.BandwidthLimit)
	if err != nil {
		return phaul.DumpResult{}, err
	}
	dir := filepath.Join(s.workRoot, req.ID, "images")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return phaul.DumpResult{}, err
	}
	criuEnd, conn, err := pageSocket()
	if err != nil {
		return phaul.DumpResult{}, err
	}
	defer conn.Close()

	hdr, err := s.headerSize(ctx)
	if err != nil {
		criuEnd.Close()
		return phaul.DumpResult{}, err
	}
	x.sw.set(req.Pages)
	defer x.sw.set(nil)
	snd := x.snd
	before := snd.Counters()
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type fwd struct {
		st  pagexfer.DumpStats
		err error
	}
	fwdc := make(chan fwd, 1)
	go func() {
		st, err := pagexfer.ForwardDump(fctx, conn, hdr, snd)
		if err != nil {
			// CRIU may be blocked writing pages nobody reads: closing our
			// end fails its dump, and CRIU resumes the tree.
			conn.Close()
		}
		fwdc <- fwd{st, err}
	}()

	frozenAt := time.Now()
	stats, derr := s.criu.Dump(ctx, criurpc.DumpOptions{
		ImagesDir: dir, PID: req.Tree.Root(), LeaveStopped: true,
		PageServer:     &criurpc.PageServerTarget{Conn: criuEnd},
		TCPEstablished: req.TCPEstablished, ShellJob: req.ShellJob,
		NetworkLock: networkLock(req.TCPEstablished),
	}, nil)
	criuEnd.Close()
	if derr != nil {
		// If the page stream broke first, that is the cause: CRIU only saw
		// its socket close.
		var f fwd
		select {
		case f = <-fwdc:
		default:
			cancel()
			conn.Close()
			f = <-fwdc
		}
		if f.err != nil && fctx.Err() == nil {
			return phaul.DumpResult{}, fmt.Errorf("page stream to the destination failed: %w (CRIU then gave up: %v)", f.err, derr)
		}
		return phaul.DumpResult{}, derr
	}
	if req.TCPEstablished {
		// CRIU keeps the network locked for a tree it leaves stopped.
		if id, err := criurpc.DumpRunID(dir); err != nil {
			s.log.Error("cannot tell the dump's network lock; its nft table stays until removed by hand", "error", err)
		} else {
			s.mu.Lock()
			s.netLocks[req.Tree.Root()] = id
			s.mu.Unlock()
		}
	}
	f := <-fwdc
	if f.err != nil {
		// CRIU finished, so the tree is frozen: let it run again.
		if rerr := s.Resume(req.Tree); rerr != nil {
			s.log.Error("resume after a failed page stream", "error", rerr)
		}
		return phaul.DumpResult{}, fmt.Errorf("page stream: %w", f.err)
	}
	files, err := imageFiles(dir)
	if err != nil {
		_ = s.Resume(req.Tree)
		return phaul.DumpResult{}, err
	}
	res := phaul.DumpResult{ImagesDir: dir, Files: files, FrozenAt: frozenAt, Pages: snd.Counters().Sub(before)}
	if stats != nil {
		res.FreezeDuration = stats.FrozenTime
	}
	return res, nil
}

func networkLock(tcp bool) criurpc.NetworkLock {
	if tcp {
		return criurpc.NetworkLockNFTables
	}
	return criurpc.NetworkLockDefault
}

// headerSize is the page-server header size of the local CRIU, as the
// last probe found it.
func (s *Source) headerSize(ctx context.Context) (int, error) {
	s.mu.Lock()
	hdr := s.hdrSize
	s.mu.Unlock()
	if hdr != 0 {
		return hdr, nil
	}
	caps, err := s.criu.Probe(ctx)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.hdrSize = caps.PageServerHeaderSize
	s.mu.Unlock()
	return caps.PageServerHeaderSize, nil
}

// imageFiles lists the images a restore needs: everything but logs.
func imageFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.Type().IsRegular() || strings.HasSuffix(e.Name(), ".log") {
			continue
		}
		out = append(out, e.Name())
	}
	return out, nil
}

// Resume lets a frozen tree run.
func (s *Source) Resume(t phaul.Tree) error {
	err := signalTree(s.procRoot, t.PIDs, t.Identity, unix.SIGCONT)
	return errors.Join(err, s.unlockNetwork(t))
}

// unlockNetwork lifts the network lock a stopped dump of t left, if any.
func (s *Source) unlockNetwork(t phaul.Tree) error {
	s.mu.Lock()
	id, ok := s.netLocks[t.Root()]
	delete(s.netLocks, t.Root())
	s.mu.Unlock()
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return criurpc.UnlockNetwork(ctx, id)
}

// Kill removes the frozen tree.
func (s *Source) Kill(t phaul.Tree) error {
	err := signalTree(s.procRoot, t.PIDs, t.Identity, unix.SIGKILL)
	// Gone means gone: a migration reports success when its source copy
	// no longer exists, not when it was told to exit (a large tree takes a
	// while to free its memory).
	for deadline := time.Now().Add(killWait); alive(s.procRoot, t.Root(), t.Identity) && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if alive(s.procRoot, t.Root(), t.Identity) {
		err = errors.Join(err, fmt.Errorf("pid %d still exists %v after SIGKILL", t.Root(), killWait))
	}
	return errors.Join(err, s.unlockNetwork(t))
}

// killWait bounds how long Kill waits for a killed tree to exit.
const killWait = 10 * time.Second

// Cleanup removes the migration's work directory and pre-copy state.
func (s *Source) Cleanup(id string) {
	s.mu.Lock()
	x := s.xfers[id]
	delete(s.xfers, id)
	s.mu.Unlock()
	if x != nil {
		_ = x.snd.Close()
	}
	if phaul.ValidID(id) {
		_ = os.RemoveAll(filepath.Join(s.workRoot, id))
	}
}
