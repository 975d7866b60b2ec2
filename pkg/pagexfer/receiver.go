package pagexfer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/klauspost/compress/zstd"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// ReceiverOptions configure a Receiver.
type ReceiverOptions struct {
	// Queue is the number of final batches checked and waiting for the
	// replay (default 4). Memory held is about Queue×BatchSize.
	Queue int
	// Logger receives debug logs; a null logger if nil.
	Logger hclog.Logger
}

// ReceiverStats are a Receiver's running totals.
type ReceiverStats struct {
	Batches       uint64 // batches accepted
	PagesStored   uint64 // pre-copy page contents stored
	PagesReplayed uint64 // pages written to CRIU's page server
	PagesFromRefs uint64 // of which resolved from the store (references, parent holes)
	PagesZero     uint64 // of which zero pages filled in
	Commands      uint64 // page-server commands written
}

type receiverStats struct {
	batches, stored, replayed, refs, zero, cmds atomic.Uint64
}

// Receiver is the destination end of a page stream.
//
// HandleBatch takes the batches of one Sender in order. Pre-copy batches
// fill the Store. Final batches are checked completely, then queued for
// the replay, which StartReplay must have started: the replay writes the
// final command stream into the local CRIU page server as batches arrive,
// with every page as content (references and parent holes filled from the
// Store, zero pages written out), so CRIU's images need no parent. Finish
// waits until the page server acknowledged CLOSE; Close stops everything.
type Receiver struct {
	store *Store
	log   hclog.Logger
	opts  ReceiverOptions

	mu      sync.Mutex // serializes HandleBatch
	lastSeq uint64
	dec     *zstd.Decoder
	pbuf    []byte
	openDst uint64
	opened  bool
	closed  bool // CLOSE seen in the final stream
	ended   bool // Last batch seen

	rmu    sync.Mutex
	replay *replayer

	st receiverStats
}

type replayer struct {
	queue  chan finalItem
	free   chan []byte
	done   chan struct{}
	err    error // set before done is closed
	cancel context.CancelFunc
	qOnce  sync.Once
}

type finalItem struct {
	seq uint64
	raw []byte
}

// NewReceiver returns a Receiver filling store.
func NewReceiver(store *Store, opts ReceiverOptions) (*Receiver, error) {
	if opts.Queue <= 0 {
		opts.Queue = 4
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	dec, err := newZstdDecoder()
	if err != nil {
		return nil, fmt.Errorf("receiver: zstd: %w", err)
	}
	return &Receiver{store: store, log: opts.Logger, opts: opts, dec: dec}, nil
}

// Stats returns a snapshot of the running totals.
func (r *Receiver) Stats() ReceiverStats {
	return ReceiverStats{
		Batches:       r.st.batches.Load(),
		PagesStored:   r.st.stored.Load(),
		PagesReplayed: r.st.replayed.Load(),
		PagesFromRefs: r.st.refs.Load(),
		PagesZero:     r.st.zero.Load(),
		Commands:      r.st.cmds.Load(),
	}
}

// HandleBatch takes the next batch. It does not keep b, but it keeps
// b.Payload of a final batch until the replay wrote it: the caller must
// not modify or reuse that memory (a gRPC message's payload is fresh for
// every message; LocalSink copies for a Sender in the same process). An
// error means the stream cannot continue.
func (r *Receiver) HandleBatch(ctx context.Context, b *Batch) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dec == nil {
		return fmt.Errorf("receiver: %w", ErrClosed)
	}
	if b.Seq != r.lastSeq+1 {
		return fmt.Errorf("%w: batch %d after batch %d", ErrBadBatch, b.Seq, r.lastSeq)
	}
	if r.ended {
		return fmt.Errorf("%w: batch %d after the last one", ErrBadBatch, b.Seq)
	}
	var err error
	switch b.Kind {
	case BatchPrecopy:
		err = r.handlePrecopy(b)
	case BatchFinal:
		err = r.handleFinal(ctx, b)
	default:
		err = fmt.Errorf("%w: batch %d of unknown kind %d", ErrBadBatch, b.Seq, b.Kind)
	}
	if err != nil {
		return err
	}
	r.lastSeq = b.Seq
	r.st.batches.Add(1)
	return nil
}

func (r *Receiver) handlePrecopy(b *Batch) error {
	raw, err := openBatch(b, r.dec, r.pbuf)
	if err != nil {
		return err
	}
	if b.Compression != CompressionNone {
		r.pbuf = raw // ours; an uncompressed payload is the caller's
	}
	rr, err := newRecordReader(raw, b.Seq, BatchPrecopy)
	if err != nil {
		return err
	}
	for {
		rec, ok, err := rr.next()
		if err != nil {
			return err
		}
		if !ok {
			return nil
		}
		switch rec.tag {
		case tagPage:
			if err := r.store.Put(rec.hash, rec.data); err != nil {
				return err
			}
			r.st.stored.Add(1)
		case tagMap:
			for i := 0; i < len(rec.hashes)/32; i++ {
				r.store.SetMapping(rec.dst, rec.vaddr+uint64(i)*PageSize, Hash(rec.hashes[i*32:(i+1)*32]))
			}
		}
	}
}

func (r *Receiver) handleFinal(ctx context.Context, b *Batch) error {
	r.rmu.Lock()
	rp := r.replay
	r.rmu.Unlock()
	if rp == nil {
		return fmt.Errorf("batch %d: %w", b.Seq, ErrReplayNotStarted)
	}
	var buf []byte
	select {
	case buf = <-rp.free:
	default:
	}
	raw, err := openBatch(b, r.dec, buf)
	if err != nil {
		return err
	}
	if err := r.checkFinal(raw, b.Seq); err != nil {
		return err
	}
	if b.Last {
		r.ended = true
	}
	select {
	case rp.queue <- finalItem{seq: b.Seq, raw: raw}:
	case <-rp.done:
		return fmt.Errorf("batch %d: replay stopped: %w", b.Seq, rp.err)
	case <-ctx.Done():
		return ctx.Err()
	}
	if b.Last {
		rp.qOnce.Do(func() { close(rp.queue) })
	}
	return nil
}

// checkFinal validates a final batch's records and their order against
// the stream so far: page commands name the open image, nothing follows
// CLOSE.
func (r *Receiver) checkFinal(raw []byte, seq uint64) error {
	rr, err := newRecordReader(raw, seq, BatchFinal)
	if err != nil {
		return err
	}
	for {
		off := rr.off
		rec, ok, err := rr.next()
		if err != nil {
			return err
		}
		if !ok {
			return nil
		}
		h := rec.hdr
		if r.closed {
			return &RecordError{Seq: seq, Offset: off, Err: ErrUnexpectedCommand, Detail: h.String() + " after CLOSE"}
		}
		switch {
		case h.Cmd == psproto.OpOpen || h.Cmd == psproto.OpOpen2:
			r.openDst, r.opened = h.DstID, true
		case h.Cmd.IsPageOp():
			if !r.opened || h.DstID != r.openDst {
				return &RecordError{Seq: seq, Offset: off, Err: psproto.ErrNotOpen, Detail: h.String()}
			}
		case h.Cmd == psproto.OpClose || h.Cmd == psproto.OpForceClose:
			r.closed = true
		}
	}
}

// StartReplay starts writing the final stream into CRIU's page server on
// ps (a connection to `criu page-server`, or the socket handed to it),
// with headers of hdrSize bytes. The replay runs until the page server
// acknowledged CLOSE, an error, ctx's end or Close. The caller keeps
// ps and closes it after Finish (the page server then exits and writes its
// images out; wait for its process before using them).
func (r *Receiver) StartReplay(ctx context.Context, ps io.ReadWriter, hdrSize int) error {
	if hdrSize != psproto.HeaderSize24 && hdrSize != psproto.HeaderSize32 {
		return fmt.Errorf("replay: %w", psproto.ErrBadHeaderSize)
	}
	r.rmu.Lock()
	defer r.rmu.Unlock()
	if r.replay != nil {
		return ErrReplayStarted
	}
	ctx, cancel := context.WithCancel(ctx)
	rp := &replayer{
		queue:  make(chan finalItem, r.opts.Queue),
		free:   make(chan []byte, r.opts.Queue+1),
		done:   make(chan struct{}),
		cancel: cancel,
	}
	r.replay = rp
	stop := func() bool { return true }
	if d, ok := ps.(interface{ SetDeadline(time.Time) error }); ok {
		stop = context.AfterFunc(ctx, func() { _ = d.SetDeadline(time.Unix(1, 0)) })
	}
	go func() {
		defer close(rp.done)
		defer stop()
		rp.err = r.runReplay(ctx, rp, ps, hdrSize)
		if rp.err != nil {
			r.log.Debug("replay stopped", "error", rp.err)
		}
	}()
	return nil
}

// replayState is the replay goroutine's connection to the page server.
type replayState struct {
	ps      io.ReadWriter
	w       *bufio.Writer // small commands, flushed before replies and data
	enc     *psproto.Encoder
	hdrSize int
	hdr     []byte
	page    []byte
	zero    []byte
	scratch []byte   // pages read from the store for one command
	bufs    [][]byte // one command's header and pages, written with writev
}

func (r *Receiver) runReplay(ctx context.Context, rp *replayer, ps io.ReadWriter, hdrSize int) error {
	w := bufio.NewWriterSize(ps, 64<<10)
	rs := &replayState{
		ps:      ps,
		w:       w,
		enc:     psproto.NewEncoder(w, hdrSize),
		hdrSize: hdrSize,
		page:    make([]byte, PageSize),
		zero:    make([]byte, PageSize),
	}
	acked := false
	for {
		var it finalItem
		var ok bool
		select {
		case it, ok = <-rp.queue:
		case <-ctx.Done():
			return ctx.Err()
		}
		if !ok {
			break
		}
		if acked {
			return fmt.Errorf("batch %d after CLOSE: %w", it.seq, ErrUnexpectedCommand)
		}
		rr, err := newRecordReader(it.raw, it.seq, BatchFinal)
		if err != nil {
			return err
		}
		for {
			rec, ok, err := rr.next()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			done, err := r.replayCommand(rs, rec)
			if err != nil {
				return fmt.Errorf("replay batch %d, %v: %w", it.seq, rec.hdr, err)
			}
			if done {
				acked = true
			}
		}
		select {
		case rp.free <- it.raw[:0]:
		default:
		}
		if acked {
			return nil
		}
	}
	if !acked {
		return ErrStreamEnded
	}
	return nil
}

// replayCommand writes one command to the page server; done reports that
// CLOSE was acknowledged.
func (r *Receiver) replayCommand(rs *replayState, rec record) (done bool, err error) {
	h := rec.hdr
	w, enc, ps, page := rs.w, rs.enc, rs.ps, rs.page
	r.st.cmds.Add(1)
	switch {
	case h.Cmd == psproto.OpOpen:
		return false, enc.WriteHeader(h)
	case h.Cmd == psproto.OpOpen2:
		if err := enc.WriteHeader(h); err != nil {
			return false, err
		}
		if err := w.Flush(); err != nil {
			return false, err
		}
		hasParent, err := psproto.ReadHasParent(ps)
		if err != nil {
			return false, err
		}
		if hasParent {
			r.log.Debug("page server has a parent image; the stream fills every page anyway", "dst_id", h.DstID)
		}
		return false, nil
	case h.Cmd == psproto.OpParent:
		if err := enc.WriteHeader(h); err != nil {
			return false, err
		}
		if err := w.Flush(); err != nil {
			return false, err
		}
		_, err := psproto.ReadStatus(ps)
		return false, err
	case h.Cmd == psproto.OpClose || h.Cmd == psproto.OpForceClose:
		if err := enc.WriteHeader(h); err != nil {
			return false, err
		}
		if err := w.Flush(); err != nil {
			return false, err
		}
		st, err := psproto.ReadStatus(ps)
		if err != nil {
			return false, err
		}
		if st != 0 {
			return false, fmt.Errorf("%w: CLOSE status %d", ErrPageServer, st)
		}
		return true, nil
	case h.HasData():
		// Header and pages go out in one writev: page contents straight
		// from the batch, referenced ones from the store's memory (or read
		// from its spill file).
		if err := w.Flush(); err != nil {
			return false, err
		}
		hdr, err := psproto.AppendHeader(rs.hdr[:0], h, rs.hdrSize)
		if err != nil {
			return false, err
		}
		rs.hdr = hdr
		if need := int(h.NrPages) * PageSize; cap(rs.scratch) < need {
			rs.scratch = make([]byte, need)
		}
		bufs := append(rs.bufs[:0], hdr)
		var refs, zeros uint64
		for es := rec.entries; len(es) > 0; {
			var e entry
			e, es = nextEntry(es)
			switch e.kind {
			case entData:
				bufs = append(bufs, e.data)
			case entRef:
				p, err := r.store.Page(e.hash, rs.scratch[refs*PageSize:(refs+1)*PageSize])
				if err != nil {
					return false, err
				}
				refs++
				bufs = append(bufs, p)
			default:
				zeros++
				bufs = append(bufs, rs.zero)
			}
		}
		rs.bufs = bufs
		nb := net.Buffers(bufs)
		if _, err := nb.WriteTo(ps); err != nil {
			return false, err
		}
		r.st.refs.Add(refs)
		r.st.zero.Add(zeros)
		r.st.replayed.Add(h.NrPages)
		return false, nil
	case h.PageFlags()&psproto.FlagParent != 0:
		// A parent hole: the content is the latest the store recorded for
		// these addresses; send it as present pages so no parent is needed.
		flags := psproto.FlagPresent | h.PageFlags()&psproto.FlagLazy
		out := psproto.Header{Cmd: psproto.OpAddF, Flags: flags, NrPages: h.NrPages, Vaddr: h.Vaddr, DstID: h.DstID}
		// Resolve every page before writing the header, so a missing page
		// leaves the page server's stream intact.
		hashes := make([]Hash, 0, min(h.NrPages, 1<<16))
		for i := uint64(0); i < h.NrPages; i++ {
			hh, ok := r.store.Mapping(h.DstID, h.Vaddr+i*PageSize)
			if !ok {
				return false, fmt.Errorf("%w: dst_id %#x vaddr %#x", ErrNoMapping, h.DstID, h.Vaddr+i*PageSize)
			}
			hashes = append(hashes, hh)
		}
		if err := enc.WriteHeader(out); err != nil {
			return false, err
		}
		for _, hh := range hashes {
			if err := r.store.Get(hh, page); err != nil {
				return false, err
			}
			if _, err := w.Write(page); err != nil {
				return false, err
			}
		}
		r.st.refs.Add(h.NrPages)
		r.st.replayed.Add(h.NrPages)
		return false, nil
	default:
		// Pages without data and without parent (lazy pages that stay
		// on the source): passed on as they are.
		return false, enc.WriteHeader(h)
	}
}

// Finish waits until the replay has written the whole final stream and
// the page server acknowledged CLOSE, and returns the replay's error.
func (r *Receiver) Finish(ctx context.Context) error {
	r.rmu.Lock()
	rp := r.replay
	r.rmu.Unlock()
	if rp == nil {
		return ErrReplayNotStarted
	}
	select {
	case <-rp.done:
		return rp.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops the replay, if any, and waits for it. It does not close the
// Store or the page-server connection.
func (r *Receiver) Close() error {
	r.rmu.Lock()
	rp := r.replay
	r.rmu.Unlock()
	if rp != nil {
		rp.cancel()
		<-rp.done
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dec != nil {
		r.dec.Close()
		r.dec = nil
	}
	if rp != nil && rp.err != nil && !errors.Is(rp.err, context.Canceled) {
		return rp.err
	}
	return nil
}
