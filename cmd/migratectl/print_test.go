package main

import (
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"testing"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func sampleEvents(moved bool) []*migratev1.MoveEvent {
	evs := []*migratev1.MoveEvent{
		{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_PREPARE, Message: "inspecting pid 4242"},
		{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_PREPARE, ElapsedMs: 210, Message: "destination host2:7446 ready (CRIU 4.2.1); tree of 1 task(s), 512 MiB"},
		{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_PRECOPY, ElapsedMs: 2100, Round: 1, Message: "round 1: 131072 of 131072 pages changed; first round copied everything",
			PagesScanned: 131072, PagesSent: 131072, RawBytes: 512 << 20, WireBytes: 513 << 20, RateBytesPerSec: 270 << 20, DirtyBytesPerSec: 4 << 20, EstimatedDowntimeMs: 2237},
		{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_PRECOPY, ElapsedMs: 2870, Round: 2, Message: "round 2: 1028 of 131072 pages changed; estimated downtime 420ms above the target 300ms: another round",
			PagesScanned: 131072, PagesSent: 1028, RawBytes: 516 << 20, WireBytes: 517 << 20, RateBytesPerSec: 5 << 20, DirtyBytesPerSec: 5 << 20, EstimatedDowntimeMs: 420},
		{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_DUMP, ElapsedMs: 3620, Message: "freezing the tree for the final dump"},
	}
	if moved {
		return append(evs, &migratev1.MoveEvent{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_DONE, ElapsedMs: 5780, Message: "moved",
			WireBytes: 529 << 20, Outcome: &migratev1.Outcome{Moved: true, DestPid: 4242, DowntimeMs: 2090, TotalMs: 5780, Rounds: 2,
				WireBytes: 529 << 20, RawBytes: 1041 << 20, ProcessLocation: "destination", PrecopyStopReason: "converged: estimated downtime 200ms is within the target 300ms"}})
	}
	return append(evs, &migratev1.MoveEvent{MigrationId: "m-1", Phase: migratev1.Phase_PHASE_FAILED, ElapsedMs: 4100, Message: "failed",
		Outcome: &migratev1.Outcome{Error: "restore failed: PID(s) [4242] were taken on the destination after the preflight; the process runs on the source",
			FailedPhase: "restore", ProcessLocation: "source", Advice: "nothing to do; the destination was cleaned up", TotalMs: 4100}})
}

func TestFollowGolden(t *testing.T) {
	for _, tt := range []struct {
		name  string
		moved bool
		json  bool
	}{
		{"move-done.txt", true, false},
		{"move-failed.txt", false, false},
		{"move-done.jsonl", true, true},
		{"move-failed.jsonl", false, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			evs := sampleEvents(tt.moved)
			i := 0
			recv := func() (*migratev1.MoveEvent, error) {
				if i == len(evs) {
					return nil, io.EOF
				}
				i++
				return evs[i-1], nil
			}
			var out bytes.Buffer
			err := follow(recv, &out, &out, tt.json)
			if tt.moved && err != nil {
				t.Fatalf("follow of a moved migration: %v", err)
			}
			if !tt.moved && err == nil {
				t.Fatal("follow of a failed migration returned no error: the exit status would be 0")
			}
			golden := filepath.Join("testdata", tt.name)
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(out.Bytes(), want) {
				t.Errorf("output differs from %s:\n--- got\n%s\n--- want\n%s", golden, out.Bytes(), want)
			}
		})
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]uint64{"100M": 100 << 20, "1gbit": 125000000, "512k": 512 << 10, "1.5G": 3 << 29, "4096": 4096} {
		got, err := parseRate(in)
		if err != nil || got != want {
			t.Errorf("parseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1M", "fast", "0"} {
		if _, err := parseRate(bad); err == nil {
			t.Errorf("parseRate(%q) accepted", bad)
		}
	}
}
