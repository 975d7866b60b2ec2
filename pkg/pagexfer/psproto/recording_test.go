package psproto

import (
	"bytes"
	"io"
	"os"
	"testing"
)

// TestCRIURecording decodes a stream recorded from CRIU 4.2.1 dumping
// memhog through ps.fd (trimmed to one page per command and eight page
// commands per image): a shmem image opened without pages, the task's
// pagemap with PRESENT and PRESENT|LAZY pages, FORCE_CLOSE.
func TestCRIURecording(t *testing.T) {
	raw, err := os.ReadFile("testdata/criu-4.2.1-dump.bin")
	if err != nil {
		t.Fatal(err)
	}
	dec := NewDecoder(bytes.NewReader(raw), HeaderSize32)
	var ops []Op
	flags := map[uint16]int{}
	images := map[uint8]int{}
	for {
		h, err := dec.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops, h.Cmd)
		switch h.Cmd {
		case OpOpen2:
			images[h.ImageType()]++
		case OpAddF:
			flags[h.Flags]++
			if err := dec.Discard(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(ops) < 4 || ops[0] != OpOpen2 || ops[len(ops)-1] != OpForceClose {
		t.Fatalf("commands %v: want OPEN2 ... FORCE_CLOSE", ops)
	}
	if images[TypePagemap] != 1 || flags[FlagPresent] == 0 || flags[FlagPresent|FlagLazy] == 0 {
		t.Fatalf("images %v, flags %v", images, flags)
	}
	// The same stream re-encoded is byte for byte the recording.
	var out bytes.Buffer
	enc := NewEncoder(&out, HeaderSize32)
	dec = NewDecoder(bytes.NewReader(raw), HeaderSize32)
	for {
		h, err := dec.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(dec)
		if err != nil {
			t.Fatal(err)
		}
		if err := enc.WriteCommand(h, data); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(out.Bytes(), raw) {
		t.Fatal("re-encoded stream differs from CRIU's")
	}
}
