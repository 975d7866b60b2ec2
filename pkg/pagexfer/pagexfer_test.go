package pagexfer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// image is the memory of one CRIU image as a dump sends it: runs of
// present pages.
type run struct {
	vaddr uint64
	flags uint16
	pages [][]byte // nil for runs without data
	n     uint64   // page count when pages is nil
}

type image struct {
	dst  uint64
	runs []run
}

// memory builds n pages where every k-th page is zero and every m-th page
// repeats an earlier page; the rest are random.
func memory(rng *rand.Rand, n, k, m int) [][]byte {
	pages := make([][]byte, n)
	for i := range pages {
		p := make([]byte, PageSize)
		switch {
		case k > 0 && i%k == k-1:
		case m > 0 && i%m == m-1 && i > 0:
			copy(p, pages[rng.IntN(i)])
		default:
			for j := 0; j < PageSize; j += 8 {
				le.PutUint64(p[j:], rng.Uint64())
			}
		}
		pages[i] = p
	}
	return pages
}

// fakeDump plays CRIU's dump side on conn: OPEN2, ADD_F, FORCE_CLOSE,
// checking the replies.
func fakeDump(conn io.ReadWriter, size int, imgs []image) error {
	enc := psproto.NewEncoder(conn, size)
	for _, img := range imgs {
		if err := enc.WriteHeader(psproto.Header{Cmd: psproto.OpOpen2, DstID: img.dst}); err != nil {
			return err
		}
		if hp, err := psproto.ReadHasParent(conn); err != nil || hp {
			return fmt.Errorf("OPEN2 reply %v %v", hp, err)
		}
		for _, r := range img.runs {
			n := r.n
			if r.pages != nil {
				n = uint64(len(r.pages))
			}
			h := psproto.Header{Cmd: psproto.OpAddF, Flags: r.flags, NrPages: n, Vaddr: r.vaddr, DstID: img.dst}
			if err := enc.WriteCommand(h, bytes.Join(r.pages, nil)); err != nil {
				return err
			}
		}
	}
	if err := enc.WriteHeader(psproto.Header{Cmd: psproto.OpForceClose}); err != nil {
		return err
	}
	st, err := psproto.ReadStatus(conn)
	if err != nil || st != 0 {
		return fmt.Errorf("CLOSE ack %d %v", st, err)
	}
	return nil
}

type pageKey struct{ dst, vaddr uint64 }

// fakePageServer plays criu page-server on conn and returns what it
// received: page content by (image, vaddr), and lazy-only ranges.
type served struct {
	pages map[pageKey][]byte
	flags map[pageKey]uint16
	cmds  []psproto.Header
}

func fakePageServer(conn io.ReadWriter, size int) (*served, error) {
	s := &served{pages: map[pageKey][]byte{}, flags: map[pageKey]uint16{}}
	dec := psproto.NewDecoder(conn, size)
	for {
		h, err := dec.Next()
		if err != nil {
			return s, err
		}
		s.cmds = append(s.cmds, h)
		switch {
		case h.Cmd == psproto.OpOpen2:
			if err := psproto.WriteHasParent(conn, false); err != nil {
				return s, err
			}
		case h.Cmd == psproto.OpForceClose || h.Cmd == psproto.OpClose:
			return s, psproto.WriteStatus(conn, 0)
		case h.Cmd.IsPageOp():
			for i := uint64(0); i < h.NrPages; i++ {
				k := pageKey{h.DstID, h.Vaddr + i*PageSize}
				s.flags[k] = h.PageFlags()
				if h.HasData() {
					p := make([]byte, PageSize)
					if err := dec.ReadPayload(p); err != nil {
						return s, err
					}
					s.pages[k] = p
				}
			}
		}
	}
}

type migration struct {
	store    *Store
	recv     *Receiver
	sender   *Sender
	batches  []Batch // copies of what crossed
	mu       sync.Mutex
	wireSink BatchSink
}

func newMigration(t *testing.T, opts SenderOptions, budget int64) *migration {
	t.Helper()
	store, err := NewStore(t.TempDir(), budget)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	recv, err := NewReceiver(store, ReceiverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { recv.Close() })
	m := &migration{store: store, recv: recv}
	sink := SinkFunc(func(ctx context.Context, b *Batch) error {
		c := *b
		c.Payload = append([]byte(nil), b.Payload...)
		m.mu.Lock()
		m.batches = append(m.batches, c)
		m.mu.Unlock()
		return LocalSink(recv).SendBatch(ctx, b)
	})
	s, err := NewSender(sink, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	m.sender = s
	return m
}

// final runs a dump of imgs through ForwardDump, the sink and the replay
// into a fake page server, and returns what the page server got.
func (m *migration) final(t *testing.T, size int, imgs []image) (DumpStats, *served) {
	t.Helper()
	ctx := context.Background()
	criuEnd, ourEnd := net.Pipe()
	psOurs, psTheirs := net.Pipe()
	defer criuEnd.Close()
	defer ourEnd.Close()
	defer psOurs.Close()
	defer psTheirs.Close()
	if err := m.recv.StartReplay(ctx, psOurs, size); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var dumpErr, psErr error
	var got *served
	wg.Add(2)
	go func() { defer wg.Done(); dumpErr = fakeDump(criuEnd, size, imgs) }()
	go func() { defer wg.Done(); got, psErr = fakePageServer(psTheirs, size) }()
	st, err := ForwardDump(ctx, ourEnd, size, m.sender)
	if err != nil {
		ourEnd.Close()
		psOurs.Close()
		wg.Wait()
		t.Fatalf("ForwardDump: %v", err)
	}
	if err := m.recv.Finish(ctx); err != nil {
		psOurs.Close()
		wg.Wait()
		t.Fatalf("Finish: %v", err)
	}
	wg.Wait()
	if dumpErr != nil {
		t.Fatalf("dump side: %v", dumpErr)
	}
	if psErr != nil {
		t.Fatalf("page server: %v", psErr)
	}
	return st, got
}

// check compares what the page server got with the dumped images.
func check(t *testing.T, imgs []image, got *served) {
	t.Helper()
	want := 0
	for _, img := range imgs {
		for _, r := range img.runs {
			if r.pages == nil {
				for i := uint64(0); i < r.n; i++ {
					k := pageKey{img.dst, r.vaddr + i*PageSize}
					if got.flags[k] != r.flags {
						t.Fatalf("page %#x of %#x: flags %#x, want %#x", k.vaddr, k.dst, got.flags[k], r.flags)
					}
				}
				continue
			}
			for i, p := range r.pages {
				k := pageKey{img.dst, r.vaddr + uint64(i)*PageSize}
				want++
				if !bytes.Equal(got.pages[k], p) {
					t.Fatalf("page %#x of image %#x differs", k.vaddr, k.dst)
				}
				if got.flags[k] != r.flags {
					t.Fatalf("page %#x of %#x: flags %#x, want %#x", k.vaddr, k.dst, got.flags[k], r.flags)
				}
			}
		}
	}
	if len(got.pages) != want {
		t.Fatalf("page server got %d pages, want %d", len(got.pages), want)
	}
}

func testImages(rng *rand.Rand, n int) []image {
	mem := memory(rng, n, 7, 5)
	a := psproto.DstID(psproto.TypePagemap, 1000)
	b := psproto.DstID(psproto.TypePagemap, 1001)
	shm := psproto.DstID(psproto.TypeShmem, 3)
	return []image{
		{dst: a, runs: []run{
			{vaddr: 0x400000, flags: psproto.FlagPresent, pages: mem[:n/2]},
			{vaddr: 0x7f0000000000, flags: psproto.FlagLazy, n: 1 << 20},
			{vaddr: 0x7f1000000000, flags: psproto.FlagPresent | psproto.FlagLazy, pages: mem[n/2 : 3*n/4]},
		}},
		{dst: b, runs: []run{
			{vaddr: 0x400000, flags: psproto.FlagPresent, pages: mem[:n/4]}, // a forked child: same content
			{vaddr: 0x800000, flags: psproto.FlagPresent, pages: mem[3*n/4:]},
		}},
		{dst: shm, runs: []run{{vaddr: 0, flags: psproto.FlagPresent, pages: mem[n/8 : n/8+3]}}},
	}
}

func TestForwardReplay(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int
		comp   Compression
		batch  int
		budget int64
	}{
		{"32/none", psproto.HeaderSize32, CompressionNone, 0, 1 << 30},
		{"32/zstd/small-batches/spill", psproto.HeaderSize32, CompressionZstd, MinBatchSize, 64 * PageSize},
		{"24/zstd", psproto.HeaderSize24, CompressionZstd, 1 << 20, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, 2))
			imgs := testImages(rng, 1200)
			m := newMigration(t, SenderOptions{Compression: tc.comp, BatchSize: tc.batch}, tc.budget)
			// Pre-copy image a's first run, as a scanner would; image b's
			// first run repeats a quarter of it.
			ctx := context.Background()
			for _, p := range imgs[0].runs[0].pages {
				if _, err := m.sender.SendPage(ctx, HashPage(p), p); err != nil {
					t.Fatal(err)
				}
			}
			if err := m.sender.Flush(ctx, false); err != nil {
				t.Fatal(err)
			}
			pre := m.sender.Counters()
			m.batches = nil
			st, got := m.final(t, tc.size, imgs)
			check(t, imgs, got)
			c := st.Counters
			total := c.PagesSent + c.PagesReferenced + c.PagesZero
			if total != st.Pages {
				t.Fatalf("sent+referenced+zero = %d, CRIU sent %d", total, st.Pages)
			}
			// Every final page is a zero mark, a reference to pre-copied
			// content, or content; the final contents do not become known.
			var want Counters
			for _, img := range imgs {
				for _, r := range img.runs {
					for _, p := range r.pages {
						switch h := HashPage(p); {
						case h == zeroHash:
							want.PagesZero++
						case m.sender.Known().Has(h):
							want.PagesReferenced++
						default:
							want.PagesSent++
						}
					}
				}
			}
			if c.PagesZero != want.PagesZero || c.PagesReferenced != want.PagesReferenced || c.PagesSent != want.PagesSent {
				t.Fatalf("counters %+v, want zero %d, referenced %d, sent %d", c, want.PagesZero, want.PagesReferenced, want.PagesSent)
			}
			if c.PagesZero < 1200/7 || c.PagesReferenced < 1200/4 {
				t.Fatalf("counters %+v: zero pages or pre-copied pages went as data", c)
			}
			if uint64(m.sender.Known().Len()) != pre.PagesSent {
				t.Fatalf("known contents %d after the final dump, pre-copy sent %d", m.sender.Known().Len(), pre.PagesSent)
			}
			if tc.comp == CompressionNone && c.WireBytes != c.RawBytes {
				t.Fatalf("uncompressed wire %d != raw %d", c.WireBytes, c.RawBytes)
			}
			if tc.budget < 1<<30 && m.store.Stats().SpilledPages == 0 {
				t.Fatalf("store with budget %d did not spill: %+v", tc.budget, m.store.Stats())
			}
			for i, b := range m.batches {
				if b.Seq != pre.Batches+uint64(i+1) || b.Kind != BatchFinal || b.Last != (i == len(m.batches)-1) {
					t.Fatalf("batch %d: seq %d kind %v last %v", i, b.Seq, b.Kind, b.Last)
				}
				if b.RawLen > uint32(max(tc.batch, DefaultBatchSize)) {
					t.Fatalf("batch %d raw %d exceeds the batch size", i, b.RawLen)
				}
			}
		})
	}
}

func TestPrecopyThenFinal(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	imgs := testImages(rng, 800)
	m := newMigration(t, SenderOptions{Compression: CompressionZstd}, 1<<30)
	ctx := context.Background()
	// Pre-copy every page of image a's first run, as a scanner would.
	for _, p := range imgs[0].runs[0].pages {
		if _, err := m.sender.SendPage(ctx, HashPage(p), p); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.sender.Flush(ctx, false); err != nil {
		t.Fatal(err)
	}
	pre := m.sender.Counters()
	if pre.PagesZero == 0 || pre.PagesSent == 0 {
		t.Fatalf("pre-copy counters %+v", pre)
	}
	// Change one page.
	changed := imgs[0].runs[0].pages[10]
	changed[100] ^= 0xff
	st, got := m.final(t, psproto.HeaderSize32, imgs)
	check(t, imgs, got)
	if st.Counters.PagesSent > 1+uint64(len(imgs[0].runs[2].pages)+len(imgs[1].runs[1].pages)) {
		t.Fatalf("final sent %d pages as data: pre-copied pages went again (%+v)", st.Counters.PagesSent, st.Counters)
	}
	if rs := m.recv.Stats(); rs.PagesFromRefs != st.Counters.PagesReferenced {
		t.Fatalf("receiver resolved %d references, sender sent %d", rs.PagesFromRefs, st.Counters.PagesReferenced)
	}
}

func TestReceiverRejects(t *testing.T) {
	ctx := context.Background()
	m := newMigration(t, SenderOptions{}, 1<<20)
	// A final batch before the replay started.
	raw := appendCmdRecord(appendPayloadHeader(nil, BatchFinal), psproto.Header{Cmd: psproto.OpOpen2, DstID: 0x101})
	b := seal(BatchFinal, 1, raw)
	if err := m.recv.HandleBatch(ctx, b); !errors.Is(err, ErrReplayNotStarted) {
		t.Fatalf("final batch without replay: %v", err)
	}
	// Sequence gap.
	pre := seal(BatchPrecopy, 2, appendPayloadHeader(nil, BatchPrecopy))
	if err := m.recv.HandleBatch(ctx, pre); !errors.Is(err, ErrBadBatch) {
		t.Fatalf("sequence gap: %v", err)
	}
	// Checksum mismatch.
	pre = seal(BatchPrecopy, 1, appendPageRecord(appendPayloadHeader(nil, BatchPrecopy), HashPage(make([]byte, PageSize)), make([]byte, PageSize)))
	pre.Checksum++
	if err := m.recv.HandleBatch(ctx, pre); !errors.Is(err, ErrBadBatch) {
		t.Fatalf("bad checksum: %v", err)
	}
	// A record of more pages than a batch can carry (zero entries are one
	// byte each, so a small compressed batch could declare millions) is
	// refused before the replay allocates for it.
	huge := appendCmdRecord(appendPayloadHeader(nil, BatchFinal), psproto.Header{Cmd: psproto.OpAddF, Flags: psproto.FlagPresent, NrPages: MaxRecordPages + 1, Vaddr: 0x1000, DstID: 0x101})
	huge = append(huge, bytes.Repeat([]byte{entZero}, MaxRecordPages+1)...)
	rr, err := newRecordReader(huge, 1, BatchFinal)
	if err != nil {
		t.Fatal(err)
	}
	var re *RecordError
	if _, _, err := rr.next(); !errors.As(err, &re) || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("record of %d pages: %v", MaxRecordPages+1, err)
	}
	// A reference to content nobody sent fails the replay, naming it.
	psOurs, psTheirs := net.Pipe()
	defer psOurs.Close()
	defer psTheirs.Close()
	go func() { _, _ = fakePageServer(psTheirs, 32) }()
	if err := m.recv.StartReplay(ctx, psOurs, 32); err != nil {
		t.Fatal(err)
	}
	raw = appendCmdRecord(raw, psproto.Header{Cmd: psproto.OpAddF, Flags: psproto.FlagPresent, NrPages: 1, Vaddr: 0x1000, DstID: 0x101})
	raw = append(raw, entRef)
	raw = append(raw, make([]byte, 32)...)
	if err := m.recv.HandleBatch(ctx, seal(BatchFinal, 1, raw)); err != nil {
		t.Fatal(err)
	}
	if err := m.recv.Finish(ctx); !errors.Is(err, ErrUnknownHash) {
		t.Fatalf("unknown reference: %v", err)
	}
}

func seal(kind BatchKind, seq uint64, raw []byte) *Batch {
	return &Batch{Kind: kind, Seq: seq, Payload: raw, RawLen: uint32(len(raw)), Checksum: crc32c(raw)}
}

// TestStorePages puts pages into a store that keeps two in memory and
// spills the rest, and reads every one back with Get and Page.
func TestStorePages(t *testing.T) {
	s, err := NewStore(t.TempDir(), 2*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pages := memory(rand.New(rand.NewPCG(5, 6)), 5, 0, 0)
	for _, p := range pages {
		if err := s.Put(HashPage(p), p); err != nil {
			t.Fatal(err)
		}
	}
	if st := s.Stats(); st.SpilledPages != 3 {
		t.Fatalf("stats %+v, want 3 pages spilled", st)
	}
	scratch := make([]byte, PageSize)
	got := make([]byte, PageSize)
	for i, p := range pages {
		h := HashPage(p)
		if err := s.Get(h, got); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("Get of page %d: %v, equal %v", i, err, bytes.Equal(got, p))
		}
		q, err := s.Page(h, scratch)
		if err != nil || !bytes.Equal(q, p) {
			t.Fatalf("Page of page %d: %v, equal %v", i, err, bytes.Equal(q, p))
		}
		if inScratch := &q[0] == &scratch[0]; inScratch != (i >= 2) {
			t.Fatalf("page %d read into scratch: %v; only spilled pages should be", i, inScratch)
		}
	}
	var missing Hash
	if _, err := s.Page(missing, scratch); !errors.Is(err, ErrUnknownHash) {
		t.Fatalf("Page of an unknown hash: %v", err)
	}
}
