package pagexfer

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the committed fuzz seed corpora under testdata/fuzz")

// seedPayloads are valid payloads of both kinds, small enough to mutate.
func seedPayloads() map[string][]byte {
	rng := rand.New(rand.NewPCG(5, 6))
	mem := memory(rng, 3, 0, 0)
	zero := make([]byte, PageSize)
	pid := psproto.DstID(psproto.TypePagemap, 1000)
	pre := appendPayloadHeader(nil, BatchPrecopy)
	pre = appendPageRecord(pre, HashPage(mem[0]), mem[0])
	pre = appendMapRecord(pre, pid, 0x400000, []Hash{HashPage(mem[0]), HashPage(zero)})
	fin := appendPayloadHeader(nil, BatchFinal)
	fin = appendCmdRecord(fin, psproto.Header{Cmd: psproto.OpOpen2, DstID: pid})
	fin = appendCmdRecord(fin, psproto.Header{Cmd: psproto.OpAddF, Flags: psproto.FlagPresent, NrPages: 3, Vaddr: 0x400000, DstID: pid})
	h := HashPage(mem[1])
	fin = append(append(append(fin, entData), h[:]...), mem[1]...)
	fin = append(append(fin, entRef), h[:]...)
	fin = append(fin, entZero)
	fin = appendCmdRecord(fin, psproto.Header{Cmd: psproto.OpAddF, Flags: psproto.FlagLazy, NrPages: 1 << 20, Vaddr: 0x7f0000000000, DstID: pid})
	fin = appendCmdRecord(fin, psproto.Header{Cmd: psproto.OpHole, NrPages: 2, Vaddr: 0x500000, DstID: pid})
	fin = appendCmdRecord(fin, psproto.Header{Cmd: psproto.OpForceClose})
	return map[string][]byte{"precopy": pre, "final": fin}
}

// seedFile checks one committed corpus file in the go test fuzz v1 format
// against what it should hold, or rewrites it with -update-seeds.
func seedFile(t *testing.T, target, name string, args ...any) {
	t.Helper()
	dir := filepath.Join("testdata", "fuzz", target)
	s := "go test fuzz v1\n"
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			s += "[]byte(" + strconv.Quote(string(v)) + ")\n"
		case uint8:
			s += fmt.Sprintf("byte(%d)\n", v)
		case uint32:
			s += fmt.Sprintf("uint32(%d)\n", v)
		case bool:
			s += fmt.Sprintf("bool(%v)\n", v)
		default:
			t.Fatalf("seed type %T", a)
		}
	}
	path := filepath.Join(dir, name)
	if *updateSeeds {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != s {
		t.Errorf("seed corpus file %s is missing or stale (rerun with -update-seeds): %v", path, err)
	}
}

// TestFuzzSeeds keeps the committed seed corpora in step with the format.
func TestFuzzSeeds(t *testing.T) {
	enc, err := newZstdEncoder()
	if err != nil {
		t.Fatal(err)
	}
	for name, p := range seedPayloads() {
		seedFile(t, "FuzzRecords", name, p, byte(p[1]))
		seedFile(t, "FuzzOpenBatch", name+"-none", p, byte(CompressionNone), uint32(len(p)), crc32c(p))
		z := enc.EncodeAll(p, nil)
		seedFile(t, "FuzzOpenBatch", name+"-zstd", z, byte(CompressionZstd), uint32(len(p)), crc32c(p))
	}
}

// FuzzRecords parses arbitrary payloads: no panic, every error a
// *RecordError with an offset inside the payload, and every command record
// accepted has exactly its entries.
func FuzzRecords(f *testing.F) {
	for _, p := range seedPayloads() {
		f.Add(p, p[1])
	}
	f.Fuzz(func(t *testing.T, raw []byte, kind byte) {
		rr, err := newRecordReader(raw, 1, BatchKind(kind))
		if err != nil {
			checkRecordError(t, err, len(raw))
			return
		}
		for {
			rec, ok, err := rr.next()
			if err != nil {
				checkRecordError(t, err, len(raw))
				return
			}
			if !ok {
				return
			}
			if rec.tag == tagCmd && rec.hdr.HasData() {
				n := uint64(0)
				for es := rec.entries; len(es) > 0; n++ {
					_, es = nextEntry(es)
				}
				if n != rec.hdr.NrPages {
					t.Fatalf("%d entries for %v", n, rec.hdr)
				}
			}
		}
	})
}

func checkRecordError(t *testing.T, err error, n int) {
	t.Helper()
	var re *RecordError
	if !errors.As(err, &re) {
		t.Fatalf("error %v (%T) is not a *RecordError", err, err)
	}
	if re.Offset < 0 || re.Offset > n {
		t.Fatalf("offset %d outside a payload of %d bytes", re.Offset, n)
	}
}

// FuzzOpenBatch checks batch envelopes: no panic, no output beyond
// RawLen, and only ErrBadBatch errors.
func FuzzOpenBatch(f *testing.F) {
	enc, err := newZstdEncoder()
	if err != nil {
		f.Fatal(err)
	}
	for _, p := range seedPayloads() {
		f.Add(p, byte(CompressionNone), uint32(len(p)), crc32c(p))
		f.Add(enc.EncodeAll(p, nil), byte(CompressionZstd), uint32(len(p)), crc32c(p))
	}
	dec, err := newZstdDecoder()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte, comp byte, rawLen, sum uint32) {
		b := &Batch{Kind: BatchFinal, Seq: 1, Compression: Compression(comp), Payload: payload, RawLen: rawLen, Checksum: sum}
		raw, err := openBatch(b, dec, nil)
		if err != nil {
			if !errors.Is(err, ErrBadBatch) {
				t.Fatalf("error %v is not ErrBadBatch", err)
			}
			return
		}
		if uint32(len(raw)) != rawLen || crc32c(raw) != sum {
			t.Fatalf("accepted %d bytes for raw length %d", len(raw), rawLen)
		}
	})
}
