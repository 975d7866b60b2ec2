package psproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Op is a page-server command (the low 16 bits of the header's cmd word).
type Op uint16

// Page-server commands.
const (
	OpAdd        Op = 1
	OpHole       Op = 2
	OpOpen       Op = 3
	OpOpen2      Op = 4
	OpParent     Op = 5
	OpAddF       Op = 6
	OpGet        Op = 7
	OpClose      Op = 0x1023
	OpForceClose Op = 0x1024
)

// String names the op as CRIU's sources do.
func (o Op) String() string {
	switch o {
	case OpAdd:
		return "ADD"
	case OpHole:
		return "HOLE"
	case OpOpen:
		return "OPEN"
	case OpOpen2:
		return "OPEN2"
	case OpParent:
		return "PARENT"
	case OpAddF:
		return "ADD_F"
	case OpGet:
		return "GET"
	case OpClose:
		return "CLOSE"
	case OpForceClose:
		return "FORCE_CLOSE"
	}
	return fmt.Sprintf("op(%#x)", uint16(o))
}

// Page flags carried in the high 16 bits of an ADD_F command.
const (
	FlagParent  uint16 = 1 // the pages live in the parent image
	FlagLazy    uint16 = 2 // the pages may be fetched lazily on restore
	FlagPresent uint16 = 4 // the page data follows the header
)

// Image types in the low 8 bits of dst_id.
const (
	TypePagemap uint8 = 1 // a task's private memory, id = pid
	TypeShmem   uint8 = 2 // shared memory, id = shmem id
)

// Header sizes: 24 bytes up to CRIU 4.1.x, 32 bytes from CRIU 4.2.
const (
	HeaderSize24 = 24
	HeaderSize32 = 32
)

// PageSize is the size of one page on the wire.
const PageSize = 4096

// MaxAddress bounds vaddr+nr_pages*PageSize: 2^57 is the largest user
// address space Linux offers (5-level paging).
const MaxAddress = uint64(1) << 57

// HeaderSizeFor returns the header size CRIU major.minor uses.
func HeaderSizeFor(major, minor int) int {
	if major > 4 || (major == 4 && minor >= 2) {
		return HeaderSize32
	}
	return HeaderSize24
}

// DstID packs an image type and id into a dst_id.
func DstID(typ uint8, id uint64) uint64 { return id<<8 | uint64(typ) }

// Header is one page-server command header.
type Header struct {
	Cmd     Op     // the command
	Flags   uint16 // FlagParent|FlagLazy|FlagPresent, only on ADD_F
	NrPages uint64 // number of pages the command covers
	Vaddr   uint64 // first page's address (or offset, for shmem)
	DstID   uint64 // image: id<<8 | type
}

// ImageType is the image type in the header's dst_id.
func (h Header) ImageType() uint8 { return uint8(h.DstID) }

// ImageID is the image id (pid or shmem id) in the header's dst_id.
func (h Header) ImageID() uint64 { return h.DstID >> 8 }

// HasData reports whether page data follows the header.
func (h Header) HasData() bool {
	return h.Cmd == OpAdd || (h.Cmd == OpAddF && h.Flags&FlagPresent != 0)
}

// PayloadLen is the number of data bytes that follow the header.
func (h Header) PayloadLen() int64 {
	if !h.HasData() {
		return 0
	}
	return int64(h.NrPages) * PageSize
}

// PageFlags returns the page flags the command means for the image, with
// ADD meaning PRESENT and HOLE meaning PARENT as the page server reads them.
func (h Header) PageFlags() uint16 {
	switch h.Cmd {
	case OpAdd:
		return FlagPresent
	case OpHole:
		return FlagParent
	}
	return h.Flags
}

func (h Header) String() string {
	return fmt.Sprintf("%v flags=%#x nr_pages=%d vaddr=%#x dst_id=%#x", h.Cmd, h.Flags, h.NrPages, h.Vaddr, h.DstID)
}

// Validate checks h as the Decoder checks a header, except for the rule
// that page commands name the open image. Errors are *DecodeError with
// offsets relative to the header's start in the 32-byte layout.
func (h Header) Validate() error { return h.validate(0, HeaderSize32) }

// IsPageOp reports whether the command addresses pages of the open image
// (ADD, HOLE, ADD_F).
func (o Op) IsPageOp() bool { return o.isPageOp() }

// isPageOp reports whether the command addresses pages of the open image.
func (o Op) isPageOp() bool { return o == OpAdd || o == OpHole || o == OpAddF }

// field offsets within a header, for error reports.
func nrOffset(size int) int64 {
	if size == HeaderSize32 {
		return 8
	}
	return 4
}

const (
	cmdOffset   = 0
	vaddrOff24  = 8
	dstOff24    = 16
	vaddrOff32  = 16
	dstOff32    = 24
	flagsOffset = 2
)

// validate checks h the way the Decoder does, except for the open-image
// rule. off is the header's offset, used in errors; size the header size.
func (h Header) validate(off int64, size int) error {
	vOff, dOff := int64(vaddrOff24), int64(dstOff24)
	if size == HeaderSize32 {
		vOff, dOff = vaddrOff32, dstOff32
	}
	bad := func(at int64, err error, format string, args ...any) error {
		return &DecodeError{Offset: off + at, Err: err, Detail: fmt.Sprintf(format, args...)}
	}
	switch h.Cmd {
	case OpAdd, OpHole, OpAddF, OpGet:
		if h.Cmd != OpAddF && h.Flags != 0 {
			return bad(flagsOffset, ErrBadFlags, "%v with flags %#x", h.Cmd, h.Flags)
		}
		if h.Cmd == OpAddF {
			f := h.Flags
			if f&^(FlagParent|FlagLazy|FlagPresent) != 0 || f == 0 ||
				(f&FlagParent != 0 && f&FlagPresent != 0) {
				return bad(flagsOffset, ErrBadFlags, "ADD_F with flags %#x", f)
			}
		}
		if t := h.ImageType(); t != TypePagemap && t != TypeShmem {
			return bad(dOff, ErrUnknownImage, "dst_id %#x", h.DstID)
		}
		if h.NrPages == 0 || h.NrPages > MaxAddress/PageSize {
			return bad(nrOffset(size), ErrBadRange, "nr_pages %d", h.NrPages)
		}
		if h.Vaddr%PageSize != 0 || h.Vaddr > MaxAddress-h.NrPages*PageSize {
			return bad(vOff, ErrBadRange, "vaddr %#x with %d pages", h.Vaddr, h.NrPages)
		}
	case OpOpen, OpOpen2, OpParent:
		if h.Flags != 0 {
			return bad(flagsOffset, ErrBadFlags, "%v with flags %#x", h.Cmd, h.Flags)
		}
		if t := h.ImageType(); t != TypePagemap && t != TypeShmem {
			return bad(dOff, ErrUnknownImage, "dst_id %#x", h.DstID)
		}
		if h.NrPages != 0 {
			return bad(nrOffset(size), ErrBadRange, "%v with nr_pages %d", h.Cmd, h.NrPages)
		}
		if h.Vaddr != 0 {
			return bad(vOff, ErrBadRange, "%v with vaddr %#x", h.Cmd, h.Vaddr)
		}
	case OpClose, OpForceClose:
		if h.Flags != 0 {
			return bad(flagsOffset, ErrBadFlags, "%v with flags %#x", h.Cmd, h.Flags)
		}
		if h.NrPages != 0 || h.Vaddr != 0 || h.DstID != 0 {
			return bad(nrOffset(size), ErrBadRange, "%v with fields set (%v)", h.Cmd, h)
		}
	default:
		return bad(cmdOffset, ErrUnknownOp, "cmd %#x", uint32(h.Flags)<<16|uint32(h.Cmd))
	}
	return nil
}

// Decoder reads and validates a page-server command stream.
//
// Next returns the next header; when the header carries data, the caller
// reads exactly PayloadLen bytes with Read (or ReadPayload, or Discard)
// before calling Next again. A Decoder is not safe for concurrent use.
type Decoder struct {
	r         io.Reader
	size      int
	off       int64
	buf       [HeaderSize32]byte
	open      uint64
	opened    bool
	remaining int64
}

// NewDecoder returns a Decoder reading headers of hdrSize bytes (24 or 32)
// from r.
func NewDecoder(r io.Reader, hdrSize int) *Decoder {
	return &Decoder{r: r, size: hdrSize}
}

// Offset is the number of bytes consumed from the stream so far.
func (d *Decoder) Offset() int64 { return d.off }

// Remaining is the number of payload bytes of the current command not yet
// read.
func (d *Decoder) Remaining() int64 { return d.remaining }

// Next reads and validates the next header. At the end of the stream, at a
// header boundary, it returns io.EOF; anywhere else a *DecodeError.
func (d *Decoder) Next() (Header, error) {
	if d.size != HeaderSize24 && d.size != HeaderSize32 {
		return Header{}, &DecodeError{Offset: d.off, Err: ErrBadHeaderSize, Detail: fmt.Sprintf("size %d", d.size)}
	}
	if d.remaining > 0 {
		return Header{}, &DecodeError{Offset: d.off, Err: ErrPayloadPending, Detail: fmt.Sprintf("%d bytes left", d.remaining)}
	}
	start := d.off
	b := d.buf[:d.size]
	n, err := io.ReadFull(d.r, b)
	d.off += int64(n)
	if err != nil {
		if err == io.EOF {
			return Header{}, io.EOF
		}
		if err == io.ErrUnexpectedEOF {
			err = ErrTruncated
		}
		return Header{}, &DecodeError{Offset: d.off, Err: err, Detail: fmt.Sprintf("in header at %d", start)}
	}
	h := parseHeader(b, d.size)
	if err := h.validate(start, d.size); err != nil {
		return Header{}, err
	}
	switch {
	case h.Cmd == OpOpen || h.Cmd == OpOpen2:
		d.open, d.opened = h.DstID, true
	case h.Cmd.isPageOp():
		if !d.opened || h.DstID != d.open {
			dOff := int64(dstOff24)
			if d.size == HeaderSize32 {
				dOff = dstOff32
			}
			return Header{}, &DecodeError{Offset: start + dOff, Err: ErrNotOpen,
				Detail: fmt.Sprintf("dst_id %#x (open: %#x)", h.DstID, d.open)}
		}
	}
	d.remaining = h.PayloadLen()
	return h, nil
}

// Read reads the current command's payload; it returns io.EOF at its end.
// A stream that ends before the payload does gives a *DecodeError.
func (d *Decoder) Read(p []byte) (int, error) {
	if d.remaining == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > d.remaining {
		p = p[:d.remaining]
	}
	n, err := d.r.Read(p)
	d.off += int64(n)
	d.remaining -= int64(n)
	if err == io.EOF && d.remaining > 0 {
		return n, &DecodeError{Offset: d.off, Err: ErrTruncated, Detail: fmt.Sprintf("%d payload bytes missing", d.remaining)}
	}
	if err != nil && err != io.EOF {
		return n, &DecodeError{Offset: d.off, Err: err}
	}
	return n, nil
}

// ReadPayload fills p from the current command's payload; len(p) must not
// exceed Remaining.
func (d *Decoder) ReadPayload(p []byte) error {
	if int64(len(p)) > d.remaining {
		return &DecodeError{Offset: d.off, Err: ErrBadRange, Detail: fmt.Sprintf("read of %d bytes with %d left", len(p), d.remaining)}
	}
	for len(p) > 0 {
		n, err := d.Read(p)
		p = p[n:]
		if err != nil {
			if errors.Is(err, io.EOF) {
				return &DecodeError{Offset: d.off, Err: ErrTruncated}
			}
			return err
		}
	}
	return nil
}

// Discard skips the rest of the current command's payload.
func (d *Decoder) Discard() error {
	_, err := io.Copy(io.Discard, d)
	return err
}

func parseHeader(b []byte, size int) Header {
	ne := binary.NativeEndian
	cmd := ne.Uint32(b[0:4])
	h := Header{Cmd: Op(cmd & 0xffff), Flags: uint16(cmd >> 16)}
	if size == HeaderSize32 {
		h.NrPages = ne.Uint64(b[8:16])
		h.Vaddr = ne.Uint64(b[16:24])
		h.DstID = ne.Uint64(b[24:32])
	} else {
		h.NrPages = uint64(ne.Uint32(b[4:8]))
		h.Vaddr = ne.Uint64(b[8:16])
		h.DstID = ne.Uint64(b[16:24])
	}
	return h
}

// AppendHeader appends h in the wire layout of hdrSize bytes.
func AppendHeader(dst []byte, h Header, hdrSize int) ([]byte, error) {
	ne := binary.NativeEndian
	cmd := uint32(h.Flags)<<16 | uint32(h.Cmd)
	switch hdrSize {
	case HeaderSize32:
		dst = ne.AppendUint32(dst, cmd)
		dst = ne.AppendUint32(dst, 0)
		dst = ne.AppendUint64(dst, h.NrPages)
	case HeaderSize24:
		if h.NrPages > math.MaxUint32 {
			return dst, fmt.Errorf("%w: nr_pages %d does not fit a 24-byte header", ErrBadRange, h.NrPages)
		}
		dst = ne.AppendUint32(dst, cmd)
		dst = ne.AppendUint32(dst, uint32(h.NrPages))
	default:
		return dst, fmt.Errorf("%w: size %d", ErrBadHeaderSize, hdrSize)
	}
	dst = ne.AppendUint64(dst, h.Vaddr)
	dst = ne.AppendUint64(dst, h.DstID)
	return dst, nil
}

// Encoder writes a page-server command stream.
type Encoder struct {
	w    io.Writer
	size int
	buf  []byte
}

// NewEncoder returns an Encoder writing headers of hdrSize bytes (24 or 32)
// to w.
func NewEncoder(w io.Writer, hdrSize int) *Encoder {
	return &Encoder{w: w, size: hdrSize, buf: make([]byte, 0, HeaderSize32)}
}

// WriteHeader validates h and writes it. Payload bytes, if h carries data,
// are written next by the caller (or use WriteCommand).
func (e *Encoder) WriteHeader(h Header) error {
	if err := h.validate(0, e.size); err != nil {
		return fmt.Errorf("encode %v: %w", h, err)
	}
	b, err := AppendHeader(e.buf[:0], h, e.size)
	if err != nil {
		return err
	}
	_, err = e.w.Write(b)
	return err
}

// WriteCommand writes h and its payload; len(data) must be PayloadLen.
func (e *Encoder) WriteCommand(h Header, data []byte) error {
	if int64(len(data)) != h.PayloadLen() {
		return fmt.Errorf("encode %v: %w: %d data bytes, want %d", h, ErrBadRange, len(data), h.PayloadLen())
	}
	if err := e.WriteHeader(h); err != nil {
		return err
	}
	if len(data) == 0 {
		return nil
	}
	_, err := e.w.Write(data)
	return err
}

// WriteHasParent writes the 1-byte reply to OPEN2.
func WriteHasParent(w io.Writer, hasParent bool) error {
	b := []byte{0}
	if hasParent {
		b[0] = 1
	}
	_, err := w.Write(b)
	return err
}

// ReadHasParent reads the 1-byte reply to OPEN2.
func ReadHasParent(r io.Reader) (bool, error) {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return false, fmt.Errorf("read OPEN2 reply: %w", err)
	}
	if b[0] > 1 {
		return false, fmt.Errorf("%w: OPEN2 reply %d", ErrBadReply, b[0])
	}
	return b[0] == 1, nil
}

// WriteStatus writes an int32 reply: the answer to PARENT, or the CLOSE
// acknowledgement (0).
func WriteStatus(w io.Writer, status int32) error {
	b := binary.NativeEndian.AppendUint32(nil, uint32(status))
	_, err := w.Write(b)
	return err
}

// ReadStatus reads an int32 reply (PARENT answer or CLOSE acknowledgement).
func ReadStatus(r io.Reader) (int32, error) {
	var b [4]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, fmt.Errorf("read page-server status: %w", err)
	}
	return int32(binary.NativeEndian.Uint32(b[:])), nil
}
