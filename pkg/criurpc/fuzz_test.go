package criurpc

import (
	"errors"
	"os"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

// FuzzDecodeResponse feeds arbitrary datagrams to the decoder of CRIU's
// answers: it must return a response or an ErrProtocol error, never panic.
func FuzzDecodeResponse(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x06, 0x10, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		resp, err := decodeResponse(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v is not ErrProtocol", err)
			}
			return
		}
		if resp.Type == nil || resp.Success == nil {
			t.Fatalf("accepted a response without its required fields: %v", resp)
		}
		if _, err := proto.Marshal(resp); err != nil {
			t.Fatalf("accepted response does not encode: %v", err)
		}
		_ = (&swrk{}).failure(opInfo{op: "dump"}, resp, nil).Error()
	})
}

// FuzzStatsImage feeds arbitrary files to the stats image parsers.
func FuzzStatsImage(f *testing.F) {
	f.Add(statsImage(f, sampleDumpStats()))
	f.Add(statsImage(f, sampleRestoreStats()))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := ParseDumpStats(b); err != nil && !errors.Is(err, ErrBadStatsImage) {
			t.Fatalf("dump: error %v is not ErrBadStatsImage", err)
		}
		if _, err := ParseRestoreStats(b); err != nil && !errors.Is(err, ErrBadStatsImage) {
			t.Fatalf("restore: error %v is not ErrBadStatsImage", err)
		}
	})
}

// FuzzSummarizeLog feeds arbitrary log text to the log summary.
func FuzzSummarizeLog(f *testing.F) {
	f.Add([]byte(sampleLog))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := summarizeLog(b)
		if len(s.tail) > logTailLines {
			t.Fatalf("tail of %d lines", len(s.tail))
		}
		_ = cleanErrMsg(string(b))
	})
}

// FuzzInventoryRunID feeds arbitrary files to the inventory reader: it
// returns a run id fit for a table name or ErrBadInventory, never panics.
func FuzzInventoryRunID(f *testing.F) {
	if b, err := os.ReadFile("testdata/inventory-tcp.img"); err == nil {
		f.Add(b)
	}
	f.Add([]byte{0x16, 0x31, 0x31, 0x58, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		id, err := parseInventoryRunID(b)
		if err != nil {
			if !errors.Is(err, ErrBadInventory) {
				t.Fatalf("error %v is not ErrBadInventory", err)
			}
			return
		}
		if id == "" || strings.ContainsAny(id, " \t\n;/\\\"'") {
			t.Fatalf("run id %q", id)
		}
	})
}
