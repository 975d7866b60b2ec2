package psproto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// stream builds a command stream from headers; data is appended to every
// header that carries some, filled with a byte derived from the vaddr.
func stream(t *testing.T, size int, hs ...Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := NewEncoder(&buf, size)
	for _, h := range hs {
		data := bytes.Repeat([]byte{byte(h.Vaddr >> 12)}, int(h.PayloadLen()))
		if err := enc.WriteCommand(h, data); err != nil {
			t.Fatalf("encode %v: %v", h, err)
		}
	}
	return buf.Bytes()
}

var pid = DstID(TypePagemap, 1000)

func dumpLike() []Header {
	return []Header{
		{Cmd: OpOpen2, DstID: pid},
		{Cmd: OpAddF, Flags: FlagPresent, NrPages: 2, Vaddr: 0x400000, DstID: pid},
		{Cmd: OpAddF, Flags: FlagPresent | FlagLazy, NrPages: 1, Vaddr: 0x7f0000001000, DstID: pid},
		{Cmd: OpAddF, Flags: FlagLazy, NrPages: 16, Vaddr: 0x7f0000100000, DstID: pid},
		{Cmd: OpHole, NrPages: 3, Vaddr: 0x500000, DstID: pid},
		{Cmd: OpAdd, NrPages: 1, Vaddr: 0x600000, DstID: pid},
		{Cmd: OpOpen2, DstID: DstID(TypeShmem, 7)},
		{Cmd: OpAddF, Flags: FlagPresent, NrPages: 1, Vaddr: 0, DstID: DstID(TypeShmem, 7)},
		{Cmd: OpParent, DstID: pid},
		{Cmd: OpForceClose},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, size := range []int{HeaderSize24, HeaderSize32} {
		t.Run(map[int]string{24: "24", 32: "32"}[size], func(t *testing.T) {
			want := dumpLike()
			raw := stream(t, size, want...)
			dec := NewDecoder(bytes.NewReader(raw), size)
			for i, w := range want {
				h, err := dec.Next()
				if err != nil {
					t.Fatalf("command %d: %v", i, err)
				}
				if h != w {
					t.Fatalf("command %d: got %v, want %v", i, h, w)
				}
				data, err := io.ReadAll(dec)
				if err != nil {
					t.Fatalf("payload %d: %v", i, err)
				}
				if int64(len(data)) != w.PayloadLen() {
					t.Fatalf("payload %d: %d bytes, want %d", i, len(data), w.PayloadLen())
				}
				if len(data) > 0 && data[0] != byte(w.Vaddr>>12) {
					t.Fatalf("payload %d: wrong content", i)
				}
			}
			if _, err := dec.Next(); err != io.EOF {
				t.Fatalf("after last command: %v, want io.EOF", err)
			}
			if dec.Offset() != int64(len(raw)) {
				t.Fatalf("offset %d, want %d", dec.Offset(), len(raw))
			}
		})
	}
}

func TestHeaderLayout(t *testing.T) {
	h := Header{Cmd: OpAddF, Flags: FlagPresent | FlagLazy, NrPages: 0x0102, Vaddr: 0x1122334455667000, DstID: 0x101}
	b32, err := AppendHeader(nil, h, HeaderSize32)
	if err != nil {
		t.Fatal(err)
	}
	// Little-endian hosts: cmd = 6<<16|6... = flags 6 in bytes 2..3.
	want32 := []byte{6, 0, 6, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0,
		0x00, 0x70, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 1, 1, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(b32, want32) {
		t.Fatalf("32-byte header\n got %x\nwant %x", b32, want32)
	}
	b24, err := AppendHeader(nil, h, HeaderSize24)
	if err != nil {
		t.Fatal(err)
	}
	want24 := []byte{6, 0, 6, 0, 2, 1, 0, 0,
		0x00, 0x70, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 1, 1, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(b24, want24) {
		t.Fatalf("24-byte header\n got %x\nwant %x", b24, want24)
	}
	if _, err := AppendHeader(nil, Header{Cmd: OpAddF, Flags: FlagLazy, NrPages: 1 << 32, DstID: 0x101}, HeaderSize24); !errors.Is(err, ErrBadRange) {
		t.Fatalf("nr_pages 2^32 in a 24-byte header: %v", err)
	}
	if HeaderSizeFor(4, 1) != 24 || HeaderSizeFor(4, 2) != 32 || HeaderSizeFor(3, 19) != 24 || HeaderSizeFor(5, 0) != 32 {
		t.Fatal("HeaderSizeFor picks the wrong size")
	}
}

func TestMalformed(t *testing.T) {
	open := Header{Cmd: OpOpen2, DstID: pid}
	okAdd := Header{Cmd: OpAddF, Flags: FlagPresent, NrPages: 1, Vaddr: 0x1000, DstID: pid}
	raw := func(size int, hs ...Header) []byte {
		var b []byte
		for _, h := range hs {
			b, _ = AppendHeader(b, h, size)
		}
		return b
	}
	tests := []struct {
		name    string
		size    int
		data    []byte
		skip    int // headers expected to decode before the error
		wantErr error
		wantOff int64
	}{
		{"unknown op", 32, raw(32, open, Header{Cmd: 9, DstID: pid}), 1, ErrUnknownOp, 32},
		{"flags on ADD", 32, raw(32, open, Header{Cmd: OpAdd, Flags: 4, NrPages: 1, DstID: pid}), 1, ErrBadFlags, 34},
		{"unknown flag bit", 32, raw(32, open, Header{Cmd: OpAddF, Flags: 8, NrPages: 1, DstID: pid}), 1, ErrBadFlags, 34},
		{"parent and present", 32, raw(32, open, Header{Cmd: OpAddF, Flags: 5, NrPages: 1, DstID: pid}), 1, ErrBadFlags, 34},
		{"no flags on ADD_F", 24, raw(24, open, Header{Cmd: OpAddF, NrPages: 1, DstID: pid}), 1, ErrBadFlags, 26},
		{"absurd nr_pages", 32, raw(32, open, Header{Cmd: OpAddF, Flags: 4, NrPages: 1 << 60, DstID: pid}), 1, ErrBadRange, 40},
		{"zero nr_pages", 24, raw(24, open, Header{Cmd: OpAdd, DstID: pid}), 1, ErrBadRange, 28},
		{"range past address space", 32, raw(32, open, Header{Cmd: OpAddF, Flags: 2, NrPages: 2, Vaddr: MaxAddress - PageSize, DstID: pid}), 1, ErrBadRange, 48},
		{"unaligned vaddr", 32, raw(32, open, Header{Cmd: OpAddF, Flags: 4, NrPages: 1, Vaddr: 0x1001, DstID: pid}), 1, ErrBadRange, 48},
		{"unknown image type", 32, raw(32, Header{Cmd: OpOpen2, DstID: 0x103}), 0, ErrUnknownImage, 24},
		{"pages without open", 32, raw(32, okAdd), 0, ErrNotOpen, 24},
		{"pages for another image", 24, raw(24, open, Header{Cmd: OpAddF, Flags: 2, NrPages: 1, DstID: DstID(TypePagemap, 9)}), 1, ErrNotOpen, 24 + 16},
		{"close with fields", 32, raw(32, Header{Cmd: OpClose, DstID: 1}), 0, ErrBadRange, 8},
		{"open with nr_pages", 32, raw(32, Header{Cmd: OpOpen2, NrPages: 1, DstID: pid}), 0, ErrBadRange, 8},
		{"truncated header", 32, raw(32, open)[:20], 0, ErrTruncated, 20},
		{"truncated payload", 32, append(raw(32, open, okAdd), make([]byte, 100)...), 2, ErrTruncated, 64 + 100},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dec := NewDecoder(bytes.NewReader(tc.data), tc.size)
			var err error
			for i := 0; ; i++ {
				var h Header
				h, err = dec.Next()
				if err != nil {
					if i != tc.skip {
						t.Fatalf("error after %d headers, want after %d: %v", i, tc.skip, err)
					}
					break
				}
				if h.HasData() {
					if err = dec.Discard(); err != nil {
						if i+1 != tc.skip {
							t.Fatalf("payload error after %d headers: %v", i+1, err)
						}
						break
					}
				}
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("error %T is not a *DecodeError", err)
			}
			if de.Offset != tc.wantOff {
				t.Fatalf("offset %d, want %d (%v)", de.Offset, tc.wantOff, err)
			}
		})
	}
}

func TestPayloadPending(t *testing.T) {
	data := stream(t, 32, Header{Cmd: OpOpen2, DstID: pid}, Header{Cmd: OpAdd, NrPages: 1, Vaddr: 0, DstID: pid}, Header{Cmd: OpClose})
	dec := NewDecoder(bytes.NewReader(data), 32)
	for range 2 {
		if _, err := dec.Next(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dec.Next(); !errors.Is(err, ErrPayloadPending) {
		t.Fatalf("Next with unread payload: %v", err)
	}
	if err := dec.ReadPayload(make([]byte, PageSize+1)); !errors.Is(err, ErrBadRange) {
		t.Fatalf("oversized ReadPayload: %v", err)
	}
	if err := dec.ReadPayload(make([]byte, PageSize)); err != nil {
		t.Fatal(err)
	}
	if h, err := dec.Next(); err != nil || h.Cmd != OpClose {
		t.Fatalf("after payload: %v %v", h, err)
	}
}

func TestReplies(t *testing.T) {
	var b bytes.Buffer
	if err := WriteHasParent(&b, false); err != nil {
		t.Fatal(err)
	}
	if err := WriteStatus(&b, 0); err != nil {
		t.Fatal(err)
	}
	if err := WriteStatus(&b, -5); err != nil {
		t.Fatal(err)
	}
	if hp, err := ReadHasParent(&b); err != nil || hp {
		t.Fatalf("has-parent %v %v", hp, err)
	}
	if s, err := ReadStatus(&b); err != nil || s != 0 {
		t.Fatalf("status %v %v", s, err)
	}
	if s, err := ReadStatus(&b); err != nil || s != -5 {
		t.Fatalf("status %v %v", s, err)
	}
	if _, err := ReadHasParent(bytes.NewReader([]byte{7})); !errors.Is(err, ErrBadReply) {
		t.Fatalf("has-parent 7: %v", err)
	}
	if _, err := ReadStatus(bytes.NewReader([]byte{0, 0})); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short status: %v", err)
	}
}
