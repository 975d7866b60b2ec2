package psproto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzDecoder feeds arbitrary bytes to the Decoder in both header sizes: it
// must never panic, must report every failure as a *DecodeError with an
// offset inside the input, and every header it accepts must encode back to
// the bytes it came from (up to the padding of 32-byte headers).
func FuzzDecoder(f *testing.F) {
	for _, size := range []int{HeaderSize24, HeaderSize32} {
		var b bytes.Buffer
		enc := NewEncoder(&b, size)
		for _, h := range dumpLike() {
			if err := enc.WriteCommand(h, make([]byte, h.PayloadLen())); err != nil {
				f.Fatal(err)
			}
		}
		f.Add(b.Bytes(), size == HeaderSize32)
	}
	f.Fuzz(func(t *testing.T, data []byte, wide bool) {
		size := HeaderSize24
		if wide {
			size = HeaderSize32
		}
		dec := NewDecoder(bytes.NewReader(data), size)
		buf := make([]byte, 3*PageSize+17)
		for {
			start := dec.Offset()
			h, err := dec.Next()
			if err == io.EOF {
				if dec.Offset() != int64(len(data)) {
					t.Fatalf("io.EOF at %d of %d", dec.Offset(), len(data))
				}
				return
			}
			if err != nil {
				checkDecodeError(t, err, len(data))
				return
			}
			enc, err := AppendHeader(nil, h, size)
			if err != nil {
				t.Fatalf("accepted header %v does not encode: %v", h, err)
			}
			orig := data[start : start+int64(size)]
			if size == HeaderSize32 {
				orig = append(append([]byte{}, orig[:4]...), append([]byte{0, 0, 0, 0}, orig[8:]...)...)
			}
			if !bytes.Equal(enc, orig) {
				t.Fatalf("re-encoded %v as %x, read from %x", h, enc, orig)
			}
			for dec.Remaining() > 0 {
				if _, err := dec.Read(buf); err != nil {
					checkDecodeError(t, err, len(data))
					return
				}
			}
		}
	})
}

func checkDecodeError(t *testing.T, err error, n int) {
	t.Helper()
	var de *DecodeError
	if !errors.As(err, &de) {
		t.Fatalf("error %v (%T) is not a *DecodeError", err, err)
	}
	if de.Offset < 0 || de.Offset > int64(n) {
		t.Fatalf("error offset %d outside input of %d bytes", de.Offset, n)
	}
}
