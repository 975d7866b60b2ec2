package psproto

import (
	"bytes"
	"io"
	"testing"
)

// benchStream is 64 commands of 64 pages each (16 MiB of page data).
func benchStream(b *testing.B) []byte {
	var buf bytes.Buffer
	enc := NewEncoder(&buf, HeaderSize32)
	pid := DstID(TypePagemap, 1000)
	if err := enc.WriteHeader(Header{Cmd: OpOpen2, DstID: pid}); err != nil {
		b.Fatal(err)
	}
	data := make([]byte, 64*PageSize)
	for i := range 64 {
		h := Header{Cmd: OpAddF, Flags: FlagPresent, NrPages: 64, Vaddr: 0x400000 + uint64(i)*64*PageSize, DstID: pid}
		if err := enc.WriteCommand(h, data); err != nil {
			b.Fatal(err)
		}
	}
	if err := enc.WriteHeader(Header{Cmd: OpForceClose}); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkDecode decodes a dump stream, reading payloads into a buffer.
func BenchmarkDecode(b *testing.B) {
	raw := benchStream(b)
	buf := make([]byte, 64*PageSize)
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		dec := NewDecoder(bytes.NewReader(raw), HeaderSize32)
		for {
			h, err := dec.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			if h.HasData() {
				if err := dec.ReadPayload(buf[:h.PayloadLen()]); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
}

// BenchmarkEncode encodes the same stream into a memory buffer.
func BenchmarkEncode(b *testing.B) {
	raw := benchStream(b)
	data := make([]byte, 64*PageSize)
	pid := DstID(TypePagemap, 1000)
	out := bytes.NewBuffer(make([]byte, 0, len(raw)))
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		out.Reset()
		enc := NewEncoder(out, HeaderSize32)
		if err := enc.WriteHeader(Header{Cmd: OpOpen2, DstID: pid}); err != nil {
			b.Fatal(err)
		}
		for i := range 64 {
			h := Header{Cmd: OpAddF, Flags: FlagPresent, NrPages: 64, Vaddr: 0x400000 + uint64(i)*64*PageSize, DstID: pid}
			if err := enc.WriteCommand(h, data); err != nil {
				b.Fatal(err)
			}
		}
		if err := enc.WriteHeader(Header{Cmd: OpForceClose}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHeader is the per-command cost without payload copies.
func BenchmarkHeader(b *testing.B) {
	var buf []byte
	h := Header{Cmd: OpAddF, Flags: FlagLazy, NrPages: 1, Vaddr: 0x400000, DstID: DstID(TypePagemap, 1)}
	open, _ := AppendHeader(nil, Header{Cmd: OpOpen2, DstID: h.DstID}, HeaderSize32)
	for range 1024 {
		buf, _ = AppendHeader(buf, h, HeaderSize32)
	}
	raw := append(open, buf...)
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		dec := NewDecoder(bytes.NewReader(raw), HeaderSize32)
		for {
			if _, err := dec.Next(); err != nil {
				if err == io.EOF {
					break
				}
				b.Fatal(err)
			}
		}
	}
}
