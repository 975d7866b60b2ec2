package host

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migrated/migrated/pkg/phaul"
)

// startSleeper starts a child that runs until the test ends.
func startSleeper(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd.Process.Pid
}

// TestIdentityTellsReusedPIDs checks that a recorded identity matches the
// process it was taken from and nothing else: not a task with another
// start time (a process that reuses the PID), not one from another boot;
// and that signals skip a task that does not match.
func TestIdentityTellsReusedPIDs(t *testing.T) {
	pid := startSleeper(t)
	tree, err := inspect("/proc", pid)
	if err != nil {
		t.Fatal(err)
	}
	id := tree.Identity
	if !id.Known() || len(id.Starts) != 1 || id.Starts[0] == 0 {
		t.Fatalf("identity %+v", id)
	}
	if !alive("/proc", pid, id) {
		t.Fatal("the recorded process is not recognised")
	}
	reused := phaul.Identity{BootID: id.BootID, Starts: []uint64{id.Starts[0] + 1}}
	if alive("/proc", pid, reused) {
		t.Fatal("a process with another start time passes as the recorded one")
	}
	rebooted := phaul.Identity{BootID: "00000000-0000-0000-0000-000000000000", Starts: id.Starts}
	if alive("/proc", pid, rebooted) {
		t.Fatal("a process from another boot passes as the recorded one")
	}
	if !alive("/proc", pid, phaul.Identity{}) {
		t.Fatal("with no identity recorded an existing pid should count")
	}

	// SIGSTOP to a mismatching identity must not reach the process.
	if err := signalTree("/proc", []int{pid}, reused, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if st, _ := procState("/proc", pid); st == 'T' {
		t.Fatal("a signal meant for another process stopped this one")
	}
	if err := signalTree("/proc", []int{pid}, id, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, _ := procState("/proc", pid); st == 'T' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the signal to the recorded process did not arrive")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// A restored tree of unknown identity counts only while stopped.
	d := &Dest{procRoot: "/proc"}
	if !d.Alive(phaul.RestoredTree{PID: pid, PIDs: []int{pid}}) {
		t.Fatal("a stopped tree of unknown identity should count as restored")
	}
	_ = unix.Kill(pid, unix.SIGCONT)
	deadline = time.Now().Add(5 * time.Second)
	for {
		if st, _ := procState("/proc", pid); st != 'T' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("SIGCONT did not arrive")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if d.Alive(phaul.RestoredTree{PID: pid, PIDs: []int{pid}}) {
		t.Fatal("a running process of unknown identity passes as a restored, stopped tree")
	}
}

// TestOrphans reports work directories no unfinished migration owns, and
// leaves them in place.
func TestOrphans(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"m-owned", "m-stray"} {
		if err := os.MkdirAll(filepath.Join(root, d, "images"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	got := Orphans(root, t.TempDir(), func(id string) bool { return id == "m-owned" })
	if len(got) != 1 || !strings.Contains(got[0], "m-stray") {
		t.Fatalf("orphans %q, want the stray work directory only", got)
	}
	if _, err := os.Stat(filepath.Join(root, "m-stray", "images")); err != nil {
		t.Fatalf("the orphaned work directory was touched: %v", err)
	}
}
