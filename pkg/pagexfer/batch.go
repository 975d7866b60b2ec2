package pagexfer

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/klauspost/compress/zstd"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// BatchKind says which stream a batch belongs to.
type BatchKind uint8

// Batch kinds.
const (
	// BatchPrecopy batches carry page content (and optionally which image
	// address holds it) while the process runs; they only fill the
	// destination's store.
	BatchPrecopy BatchKind = 1
	// BatchFinal batches carry the final dump's page-server command stream,
	// in CRIU's order, with pages as data, hash references or zero marks.
	BatchFinal BatchKind = 2
)

func (k BatchKind) String() string {
	switch k {
	case BatchPrecopy:
		return "precopy"
	case BatchFinal:
		return "final"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Compression is how a batch's payload is compressed on the wire.
type Compression uint8

// Compressions.
const (
	CompressionNone Compression = 0
	CompressionZstd Compression = 1
)

func (c Compression) String() string {
	switch c {
	case CompressionNone:
		return "none"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression(%d)", uint8(c))
}

// Limits on batch sizes, enforced on both ends.
const (
	// MaxBatchRaw is the largest uncompressed payload a batch may carry.
	MaxBatchRaw = 16 << 20
	// MaxBatchWire is the largest payload a batch may put on the wire.
	MaxBatchWire = MaxBatchRaw + MaxBatchRaw/64 + 1024
	// DefaultBatchSize is the uncompressed payload size at which the
	// Sender closes a batch.
	DefaultBatchSize = 2 << 20
	// MinBatchSize is the smallest BatchSize the Sender accepts.
	MinBatchSize = 64 << 10
)

// Batch is one unit of the page stream between the agents.
//
// The payload is a sequence of records (see the package documentation for
// the format), compressed as Compression says. RawLen and Checksum
// (CRC-32C, Castagnoli) describe the uncompressed payload. Seq numbers the
// batches of one Sender from 1 without gaps, across both kinds. Last marks
// the final stream's last batch.
type Batch struct {
	Kind        BatchKind
	Seq         uint64
	Compression Compression
	Payload     []byte
	RawLen      uint32
	Checksum    uint32
	Last        bool
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Payload format version and record tags.
const (
	formatVersion = 2

	tagPage = 1 // precopy: hash[32] data[4096]
	tagMap  = 2 // precopy: dst_id u64, vaddr u64, n u32, n×hash[32]
	tagCmd  = 3 // final: op u16, flags u16, nr u64, vaddr u64, dst_id u64, entries

	entData = 0 // data[4096]
	entRef  = 1 // hash[32]
	entZero = 2 // nothing

	payloadHeaderLen = 2  // version, kind
	cmdRecordLen     = 29 // tag + op..dst_id
	pageRecordLen    = 1 + 32 + PageSize
	dataEntryLen     = 1 + PageSize
	refEntryLen      = 1 + 32

	// MaxRecordPages is the most pages a final command record may carry:
	// as many data entries as fit the largest batch. A Sender never makes
	// a larger record, and the Receiver allocates up to this many pages to
	// replay one.
	MaxRecordPages = (MaxBatchRaw - payloadHeaderLen - cmdRecordLen) / dataEntryLen
)

var le = binary.LittleEndian

func appendPayloadHeader(b []byte, kind BatchKind) []byte {
	return append(b, formatVersion, byte(kind))
}

func appendPageRecord(b []byte, h Hash, data []byte) []byte {
	b = append(b, tagPage)
	b = append(b, h[:]...)
	return append(b, data...)
}

func appendMapRecord(b []byte, dst, vaddr uint64, hashes []Hash) []byte {
	b = append(b, tagMap)
	b = le.AppendUint64(b, dst)
	b = le.AppendUint64(b, vaddr)
	b = le.AppendUint32(b, uint32(len(hashes)))
	for i := range hashes {
		b = append(b, hashes[i][:]...)
	}
	return b
}

func appendCmdRecord(b []byte, h psproto.Header) []byte {
	b = append(b, tagCmd)
	b = le.AppendUint16(b, uint16(h.Cmd))
	b = le.AppendUint16(b, h.Flags)
	b = le.AppendUint64(b, h.NrPages)
	b = le.AppendUint64(b, h.Vaddr)
	return le.AppendUint64(b, h.DstID)
}

// record is one parsed payload record; slices point into the payload.
type record struct {
	tag     byte
	hash    Hash           // tagPage
	data    []byte         // tagPage
	dst     uint64         // tagMap
	vaddr   uint64         // tagMap
	hashes  []byte         // tagMap: n×32 bytes
	hdr     psproto.Header // tagCmd
	entries []byte         // tagCmd with data: hdr.NrPages validated entries
}

// recordReader parses and validates a raw payload.
type recordReader struct {
	b    []byte
	off  int
	seq  uint64
	kind BatchKind
}

func newRecordReader(raw []byte, seq uint64, kind BatchKind) (*recordReader, error) {
	r := &recordReader{b: raw, seq: seq, kind: kind}
	if len(raw) < payloadHeaderLen {
		return nil, r.fail(0, "payload of %d bytes has no header", len(raw))
	}
	if raw[0] != formatVersion {
		return nil, r.fail(0, "format version %d, want %d", raw[0], formatVersion)
	}
	if BatchKind(raw[1]) != kind {
		return nil, r.fail(1, "payload kind %d in a %v batch", raw[1], kind)
	}
	r.off = payloadHeaderLen
	return r, nil
}

func (r *recordReader) fail(off int, format string, args ...any) error {
	return &RecordError{Seq: r.seq, Offset: off, Err: ErrBadRecord, Detail: fmt.Sprintf(format, args...)}
}

func (r *recordReader) need(n int, what string) error {
	if len(r.b)-r.off < n {
		return r.fail(r.off, "truncated %s: %d bytes left, want %d", what, len(r.b)-r.off, n)
	}
	return nil
}

// next returns the next record; ok is false at the end of the payload.
func (r *recordReader) next() (rec record, ok bool, err error) {
	if r.off == len(r.b) {
		return rec, false, nil
	}
	start := r.off
	rec.tag = r.b[r.off]
	switch {
	case rec.tag == tagPage && r.kind == BatchPrecopy:
		if err := r.need(pageRecordLen, "page record"); err != nil {
			return rec, false, err
		}
		copy(rec.hash[:], r.b[r.off+1:])
		rec.data = r.b[r.off+33 : r.off+pageRecordLen]
		r.off += pageRecordLen
	case rec.tag == tagMap && r.kind == BatchPrecopy:
		if err := r.need(21, "map record"); err != nil {
			return rec, false, err
		}
		rec.dst = le.Uint64(r.b[r.off+1:])
		rec.vaddr = le.Uint64(r.b[r.off+9:])
		n := uint64(le.Uint32(r.b[r.off+17:]))
		if rec.vaddr%PageSize != 0 || n == 0 || rec.vaddr/PageSize+n > psproto.MaxAddress/PageSize {
			return rec, false, r.fail(start+9, "map of %d pages at %#x", n, rec.vaddr)
		}
		r.off += 21
		if err := r.need(int(n)*32, "map hashes"); err != nil {
			return rec, false, err
		}
		rec.hashes = r.b[r.off : r.off+int(n)*32]
		r.off += int(n) * 32
	case rec.tag == tagCmd && r.kind == BatchFinal:
		if err := r.need(cmdRecordLen, "command record"); err != nil {
			return rec, false, err
		}
		b := r.b[r.off+1:]
		rec.hdr = psproto.Header{
			Cmd:     psproto.Op(le.Uint16(b[0:])),
			Flags:   le.Uint16(b[2:]),
			NrPages: le.Uint64(b[4:]),
			Vaddr:   le.Uint64(b[12:]),
			DstID:   le.Uint64(b[20:]),
		}
		if rec.hdr.Cmd == psproto.OpGet {
			return rec, false, r.fail(start+1, "GET in a dump stream")
		}
		if err := rec.hdr.Validate(); err != nil {
			return rec, false, &RecordError{Seq: r.seq, Offset: start + 1, Err: err, Detail: rec.hdr.String()}
		}
		r.off += cmdRecordLen
		if rec.hdr.HasData() {
			if rec.hdr.NrPages > MaxRecordPages {
				return rec, false, r.fail(start+5, "%d pages in one record, at most %d", rec.hdr.NrPages, MaxRecordPages)
			}
			if rec.hdr.NrPages > uint64(len(r.b)-r.off) {
				return rec, false, r.fail(start+5, "%d pages with %d bytes left", rec.hdr.NrPages, len(r.b)-r.off)
			}
			es := r.off
			for i := uint64(0); i < rec.hdr.NrPages; i++ {
				if err := r.need(1, "page entry"); err != nil {
					return rec, false, err
				}
				switch r.b[r.off] {
				case entData:
					if err := r.need(dataEntryLen, "data entry"); err != nil {
						return rec, false, err
					}
					r.off += dataEntryLen
				case entRef:
					if err := r.need(refEntryLen, "reference entry"); err != nil {
						return rec, false, err
					}
					r.off += refEntryLen
				case entZero:
					r.off++
				default:
					return rec, false, r.fail(r.off, "page entry type %d", r.b[r.off])
				}
			}
			rec.entries = r.b[es:r.off]
		}
	default:
		return rec, false, r.fail(start, "record type %d in a %v batch", rec.tag, r.kind)
	}
	return rec, true, nil
}

// entry is one page of a command record.
type entry struct {
	kind byte
	hash Hash
	data []byte
}

// nextEntry decodes the first entry of validated entries and returns the rest.
func nextEntry(b []byte) (entry, []byte) {
	e := entry{kind: b[0]}
	switch e.kind {
	case entData:
		e.data = b[1:dataEntryLen]
		return e, b[dataEntryLen:]
	case entRef:
		copy(e.hash[:], b[1:33])
		return e, b[refEntryLen:]
	}
	return e, b[1:]
}

// openBatch checks a batch's envelope and returns its uncompressed payload:
// b.Payload itself when it is not compressed, otherwise decompressed into
// buf's storage when it fits (or a new slice).
func openBatch(b *Batch, dec *zstd.Decoder, buf []byte) ([]byte, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("batch %d: %w: %s", b.Seq, ErrBadBatch, fmt.Sprintf(format, args...))
	}
	if b.Kind != BatchPrecopy && b.Kind != BatchFinal {
		return nil, bad("unknown kind %d", b.Kind)
	}
	if b.RawLen > MaxBatchRaw {
		return nil, bad("raw length %d above %d", b.RawLen, MaxBatchRaw)
	}
	if len(b.Payload) > MaxBatchWire {
		return nil, bad("payload of %d bytes above %d", len(b.Payload), MaxBatchWire)
	}
	var raw []byte
	switch b.Compression {
	case CompressionNone:
		if uint32(len(b.Payload)) != b.RawLen {
			return nil, bad("payload of %d bytes, raw length %d", len(b.Payload), b.RawLen)
		}
		raw = b.Payload
	case CompressionZstd:
		if dec == nil {
			return nil, bad("zstd payload without a decoder")
		}
		if cap(buf) < int(b.RawLen) {
			buf = make([]byte, 0, b.RawLen)
		}
		var err error
		raw, err = dec.DecodeAll(b.Payload, buf[:0])
		if err != nil {
			return nil, bad("zstd: %v", err)
		}
		if uint32(len(raw)) != b.RawLen {
			return nil, bad("decompressed %d bytes, raw length %d", len(raw), b.RawLen)
		}
	default:
		return nil, bad("unknown compression %d", b.Compression)
	}
	if sum := crc32.Checksum(raw, castagnoli); sum != b.Checksum {
		return nil, bad("checksum %#08x, batch says %#08x", sum, b.Checksum)
	}
	return raw, nil
}

// newZstdDecoder returns a decoder bounded to MaxBatchRaw of output.
func newZstdDecoder() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(MaxBatchRaw),
		zstd.WithDecoderMaxWindow(MaxBatchRaw))
}

// newZstdEncoder returns the encoder batches are compressed with.
func newZstdEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1),
		zstd.WithLowerEncoderMem(true))
}

func crc32c(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }
