package pagexfer

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/time/rate"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// BatchSink takes batches from a Sender, in order, one at a time.
//
// SendBatch delivers b to the destination (or queues it on a transport that
// does) and blocks while the transport is full: that is how a slow
// destination slows the source down. It must not keep b or b.Payload after
// it returns; the Sender reuses the memory. An error is final: the Sender
// stops and reports it from every later call.
type BatchSink interface {
	SendBatch(ctx context.Context, b *Batch) error
}

// SinkFunc adapts a function to a BatchSink.
type SinkFunc func(ctx context.Context, b *Batch) error

// SendBatch calls f.
func (f SinkFunc) SendBatch(ctx context.Context, b *Batch) error { return f(ctx, b) }

// LocalSink connects a Sender to a Receiver in the same process: it hands
// every batch to r with a copy of its payload, which the Receiver may keep
// while the Sender reuses its own.
func LocalSink(r *Receiver) BatchSink {
	return SinkFunc(func(ctx context.Context, b *Batch) error {
		c := *b
		c.Payload = append([]byte(nil), b.Payload...)
		return r.HandleBatch(ctx, &c)
	})
}

// SenderOptions configure a Sender.
type SenderOptions struct {
	// Compression of batch payloads; the destination must accept it.
	Compression Compression
	// BandwidthLimit caps the payload bytes put on the wire per second;
	// 0 means no limit.
	BandwidthLimit int64
	// BatchSize is the uncompressed payload size at which a batch is
	// closed: DefaultBatchSize if 0, at least MinBatchSize, at most
	// MaxBatchRaw.
	BatchSize int
	// Pipeline is the number of closed batches that may wait for the sink
	// while the producer fills the next one (default 2). Memory held by a
	// Sender is about (Pipeline+2)×BatchSize.
	Pipeline int
	// Known is the set of contents the destination holds; a new set if nil.
	Known *Known
	// Logger receives debug logs; a null logger if nil.
	Logger hclog.Logger
}

// Counters are a Sender's running totals.
type Counters struct {
	Batches         uint64 // batches handed to the sink
	RawBytes        uint64 // uncompressed payload bytes of those batches
	WireBytes       uint64 // payload bytes on the wire (after compression)
	PagesSent       uint64 // pages sent with their content
	PagesReferenced uint64 // final-stream pages sent as a hash reference
	PagesZero       uint64 // all-zero pages, never sent as data
	PagesSkipped    uint64 // pre-copy pages not sent: the destination holds the content
}

type counters struct {
	batches, raw, wire, sent, refs, zero, skipped atomic.Uint64
}

func (c *counters) snapshot() Counters {
	return Counters{
		Batches:         c.batches.Load(),
		RawBytes:        c.raw.Load(),
		WireBytes:       c.wire.Load(),
		PagesSent:       c.sent.Load(),
		PagesReferenced: c.refs.Load(),
		PagesZero:       c.zero.Load(),
		PagesSkipped:    c.skipped.Load(),
	}
}

// Sub returns the difference c-o, field by field.
func (c Counters) Sub(o Counters) Counters {
	return Counters{
		Batches:         c.Batches - o.Batches,
		RawBytes:        c.RawBytes - o.RawBytes,
		WireBytes:       c.WireBytes - o.WireBytes,
		PagesSent:       c.PagesSent - o.PagesSent,
		PagesReferenced: c.PagesReferenced - o.PagesReferenced,
		PagesZero:       c.PagesZero - o.PagesZero,
		PagesSkipped:    c.PagesSkipped - o.PagesSkipped,
	}
}

// Sender packs pages and commands into batches and hands them to a sink.
//
// The caller fills batches (SendPage for pre-copy, ForwardDump for the
// final stream) while a goroutine owned by the Sender compresses, paces and
// sends closed batches; at most Pipeline closed batches wait, so a slow
// sink blocks the producer. One Sender serves a whole migration: its batch
// numbers and its Known set span every round and the final dump. Its
// filling methods are not safe for concurrent use; Counters is. Close
// stops the goroutine.
type Sender struct {
	hashes []Hash // sendPages' scratch
	zeros  []bool
	sink   BatchSink
	opts   SenderOptions
	known  *Known
	log    hclog.Logger
	lim    *rate.Limiter
	burst  int

	cur     []byte // batch being filled; nil when none
	curKind BatchKind
	seq     uint64

	work chan job
	free chan []byte
	done chan struct{}

	errMu sync.Mutex
	err   error

	closeOnce sync.Once
	c         counters
}

type job struct {
	ctx     context.Context
	raw     []byte
	kind    BatchKind
	seq     uint64
	last    bool
	flushed chan struct{}
}

// NewSender returns a Sender writing to sink. Call Close when done.
func NewSender(sink BatchSink, opts SenderOptions) (*Sender, error) {
	switch {
	case opts.BatchSize == 0:
		opts.BatchSize = DefaultBatchSize
	case opts.BatchSize < MinBatchSize:
		opts.BatchSize = MinBatchSize
	case opts.BatchSize > MaxBatchRaw:
		opts.BatchSize = MaxBatchRaw
	}
	if opts.Pipeline <= 0 {
		opts.Pipeline = 2
	}
	if opts.Compression != CompressionNone && opts.Compression != CompressionZstd {
		return nil, fmt.Errorf("sender: unknown compression %v", opts.Compression)
	}
	if opts.Known == nil {
		opts.Known = NewKnown()
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	s := &Sender{
		sink:  sink,
		opts:  opts,
		known: opts.Known,
		log:   opts.Logger,
		work:  make(chan job, opts.Pipeline),
		free:  make(chan []byte, opts.Pipeline+2),
		done:  make(chan struct{}),
	}
	if opts.BandwidthLimit > 0 {
		// Pace in slices of at most 1/8 s of traffic so a low limit does
		// not let a whole batch through as one burst.
		s.burst = int(min(max(opts.BandwidthLimit/8, 16<<10), MaxBatchWire))
		s.lim = rate.NewLimiter(rate.Limit(opts.BandwidthLimit), s.burst)
	}
	var enc *zstd.Encoder
	if opts.Compression == CompressionZstd {
		var err error
		if enc, err = newZstdEncoder(); err != nil {
			return nil, fmt.Errorf("sender: zstd: %w", err)
		}
	}
	go s.run(enc)
	return s, nil
}

// Known is the set of contents the destination holds.
func (s *Sender) Known() *Known { return s.known }

// Counters returns a snapshot of the running totals.
func (s *Sender) Counters() Counters { return s.c.snapshot() }

func (s *Sender) setErr(err error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.errMu.Unlock()
}

// Err returns the error that stopped the Sender, if any.
func (s *Sender) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

// run is the sending goroutine.
func (s *Sender) run(enc *zstd.Encoder) {
	defer close(s.done)
	var wire []byte
	for j := range s.work {
		if j.raw != nil && s.Err() == nil {
			if err := s.send(j, enc, &wire); err != nil {
				s.setErr(err)
			}
		}
		if j.raw != nil {
			select {
			case s.free <- j.raw[:0]:
			default:
			}
		}
		if j.flushed != nil {
			close(j.flushed)
		}
	}
}

func (s *Sender) send(j job, enc *zstd.Encoder, wire *[]byte) error {
	b := &Batch{
		Kind:        j.kind,
		Seq:         j.seq,
		Compression: CompressionNone,
		Payload:     j.raw,
		RawLen:      uint32(len(j.raw)),
		Checksum:    crc32.Checksum(j.raw, castagnoli),
		Last:        j.last,
	}
	if enc != nil {
		*wire = enc.EncodeAll(j.raw, (*wire)[:0])
		if len(*wire) < len(j.raw) {
			b.Compression = CompressionZstd
			b.Payload = *wire
		}
	}
	if s.lim != nil {
		for left := len(b.Payload); left > 0; {
			n := min(left, s.burst)
			if err := s.lim.WaitN(j.ctx, n); err != nil {
				return fmt.Errorf("batch %d: bandwidth limit: %w", j.seq, err)
			}
			left -= n
		}
	}
	if err := s.sink.SendBatch(j.ctx, b); err != nil {
		return fmt.Errorf("send %v batch %d: %w", j.kind, j.seq, err)
	}
	s.c.batches.Add(1)
	s.c.raw.Add(uint64(len(j.raw)))
	s.c.wire.Add(uint64(len(b.Payload)))
	return nil
}

// room makes sure the batch being filled is of kind and has n more bytes
// of space, closing the current batch first if needed.
func (s *Sender) room(ctx context.Context, kind BatchKind, n int) error {
	if err := s.Err(); err != nil {
		return err
	}
	if s.cur != nil && (s.curKind != kind || len(s.cur)+n > s.opts.BatchSize) && len(s.cur) > payloadHeaderLen {
		if err := s.enqueue(ctx, false, nil); err != nil {
			return err
		}
	}
	if s.cur == nil || s.curKind != kind {
		select {
		case b := <-s.free:
			s.cur = b
		default:
			s.cur = make([]byte, 0, s.opts.BatchSize+dataEntryLen+cmdRecordLen)
		}
		s.cur = appendPayloadHeader(s.cur, kind)
		s.curKind = kind
	}
	return nil
}

// enqueue hands the current batch (possibly nil) to the sending goroutine.
func (s *Sender) enqueue(ctx context.Context, last bool, flushed chan struct{}) error {
	j := job{ctx: ctx, raw: s.cur, kind: s.curKind, last: last, flushed: flushed}
	if j.raw != nil {
		s.seq++
		j.seq = s.seq
	}
	select {
	case s.work <- j:
		s.cur = nil
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SendPage puts one pre-copy page into the stream, unless it is all zero
// or its content is known to the destination. It reports whether the
// content went into a batch. h must be HashPage(data).
func (s *Sender) SendPage(ctx context.Context, h Hash, data []byte) (bool, error) {
	if len(data) != PageSize {
		return false, fmt.Errorf("send page: %d bytes, want %d", len(data), PageSize)
	}
	if h == zeroHash {
		s.c.zero.Add(1)
		return false, nil
	}
	if s.known.Has(h) {
		s.c.skipped.Add(1)
		return false, nil
	}
	if err := s.room(ctx, BatchPrecopy, pageRecordLen); err != nil {
		return false, err
	}
	s.cur = appendPageRecord(s.cur, h, data)
	s.known.Add(h)
	s.c.sent.Add(1)
	return true, nil
}

// SendMapping records in the pre-copy stream that the pages of image dst
// starting at vaddr hold the given contents (for CRIU pre-dump images
// whose later dumps refer to the parent).
func (s *Sender) SendMapping(ctx context.Context, dst, vaddr uint64, hashes []Hash) error {
	for len(hashes) > 0 {
		n := min(len(hashes), (s.opts.BatchSize-64)/32)
		if err := s.room(ctx, BatchPrecopy, 21+32*n); err != nil {
			return err
		}
		s.cur = appendMapRecord(s.cur, dst, vaddr, hashes[:n])
		hashes = hashes[n:]
		vaddr += uint64(n) * PageSize
	}
	return nil
}

// sendCommand puts a final-stream command without page data.
func (s *Sender) sendCommand(ctx context.Context, h psproto.Header) error {
	if err := s.room(ctx, BatchFinal, cmdRecordLen); err != nil {
		return err
	}
	s.cur = appendCmdRecord(s.cur, h)
	return nil
}

// maxPagesPerRecord bounds the pages of one command record so that it fits
// a batch of the configured size.
func (s *Sender) maxPagesPerRecord() int {
	return min(MaxRecordPages, max(1, (s.opts.BatchSize-payloadHeaderLen-cmdRecordLen)/dataEntryLen))
}

// sendPages puts a final-stream command whose data is pages (len
// h.NrPages×PageSize, at most maxPagesPerRecord pages): each page goes as
// a zero mark, a reference to a content the destination stores (from
// pre-copy), or its content. The destination writes final contents
// straight into its CRIU page server and does not keep them, so they do
// not become known; without pre-copy nothing is known and pages are not
// hashed at all.
func (s *Sender) sendPages(ctx context.Context, h psproto.Header, pages []byte) error {
	n := len(pages) / PageSize
	if err := s.room(ctx, BatchFinal, cmdRecordLen+n*dataEntryLen); err != nil {
		return err
	}
	s.cur = appendCmdRecord(s.cur, h)
	if cap(s.hashes) < n {
		s.hashes = make([]Hash, n)
		s.zeros = make([]bool, n)
	}
	hs, zs := s.hashes[:n], s.zeros[:n]
	dedup := s.known.Len() > 0
	if dedup {
		hashPages(pages, hs, zs)
	} else {
		for i := range n {
			zs[i] = isZero(pages[i*PageSize : (i+1)*PageSize])
		}
	}
	var zero, refs, sent uint64
	for i := 0; i < n; i++ {
		p := pages[i*PageSize : (i+1)*PageSize]
		switch {
		case zs[i]:
			s.cur = append(s.cur, entZero)
			zero++
		case dedup && s.known.Has(hs[i]):
			s.cur = append(s.cur, entRef)
			s.cur = append(s.cur, hs[i][:]...)
			refs++
		default:
			s.cur = append(s.cur, entData)
			s.cur = append(s.cur, p...)
			sent++
		}
	}
	s.c.zero.Add(zero)
	s.c.refs.Add(refs)
	s.c.sent.Add(sent)
	return nil
}

// Flush closes the batch being filled, hands it to the sink, and waits
// until the sink has taken every batch so far. last marks the batch as the
// final stream's end (an empty final batch is sent if nothing is pending).
func (s *Sender) Flush(ctx context.Context, last bool) error {
	if err := s.Err(); err != nil {
		return err
	}
	if last && s.cur == nil {
		if err := s.room(ctx, BatchFinal, 0); err != nil {
			return err
		}
	}
	if s.cur != nil && len(s.cur) == payloadHeaderLen && !last {
		select {
		case s.free <- s.cur[:0]:
		default:
		}
		s.cur = nil
	}
	flushed := make(chan struct{})
	if err := s.enqueue(ctx, last, flushed); err != nil {
		return err
	}
	select {
	case <-flushed:
	case <-ctx.Done():
		return ctx.Err()
	}
	return s.Err()
}

// Close stops the sending goroutine after the batches already handed to
// it; a batch being filled is dropped. It returns the Sender's error.
func (s *Sender) Close() error {
	s.closeOnce.Do(func() {
		close(s.work)
		<-s.done
		s.setErr(ErrClosed)
	})
	if err := s.Err(); !errors.Is(err, ErrClosed) {
		return err
	}
	return nil
}
