package host

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/migrated/migrated/pkg/phaul"
)

// inspect walks the tree rooted at pid through /proc: every task's
// children (threads' children included), the regular files it holds open,
// and its private resident memory.
func inspect(procRoot string, pid int) (phaul.Tree, error) {
	if _, err := os.Stat(filepath.Join(procRoot, strconv.Itoa(pid))); err != nil {
		return phaul.Tree{}, fmt.Errorf("%w: pid %d", phaul.ErrNoProcess, pid)
	}
	if st, _ := procState(procRoot, pid); st == 'Z' || st == 'X' {
		return phaul.Tree{}, fmt.Errorf("%w: pid %d has exited (zombie)", phaul.ErrNoProcess, pid)
	}
	var t phaul.Tree
	seen := map[int]bool{}
	queue := []int{pid}
	for len(queue) > 0 && len(t.PIDs) < 65536 {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		t.PIDs = append(t.PIDs, p)
		queue = append(queue, children(procRoot, p)...)
	}
	files := map[string]int64{}
	for _, p := range t.PIDs {
		for path, size := range openFiles(procRoot, p) {
			files[path] = size
		}
		t.MemoryBytes += privateMemory(procRoot, p)
	}
	for path, size := range files {
		t.Files = append(t.Files, phaul.FileRef{Path: path, Size: size})
	}
	sort.Slice(t.Files, func(a, b int) bool { return t.Files[a].Path < t.Files[b].Path })
	t.Identity = identify(procRoot, t.PIDs)
	return t, nil
}

// identify records the boot id and the tasks' start times; a task whose
// start time cannot be read gets 0, which matches no process.
func identify(procRoot string, pids []int) phaul.Identity {
	id := phaul.Identity{BootID: bootID(), Starts: make([]uint64, len(pids))}
	for i, p := range pids {
		id.Starts[i], _ = procStart(procRoot, p)
	}
	return id
}

// bootID is the kernel's boot id: it changes with every boot, so a
// journaled identity from before a reboot matches nothing after it.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// procStart returns the start time of pid in clock ticks after boot
// (field 22 of /proc/PID/stat).
func procStart(procRoot string, pid int) (uint64, error) {
	f, err := statFields(procRoot, pid)
	if err != nil {
		return 0, err
	}
	// f[0] is field 3 (state); the start time is field 22.
	if len(f) < 20 {
		return 0, errors.New("malformed stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// same reports whether pid is the task identity recorded at index i: with
// an unknown identity any existing pid is.
func same(procRoot string, id phaul.Identity, i, pid int) bool {
	if !id.Known() {
		return true
	}
	if i >= len(id.Starts) || id.BootID != bootID() {
		return false
	}
	st, err := procStart(procRoot, pid)
	return err == nil && st == id.Starts[i]
}

func children(procRoot string, pid int) []int {
	tasks, _ := os.ReadDir(filepath.Join(procRoot, strconv.Itoa(pid), "task"))
	var out []int
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "task", task.Name(), "children"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// openFiles returns the regular files pid holds open, with their sizes.
func openFiles(procRoot string, pid int) map[string]int64 {
	dir := filepath.Join(procRoot, strconv.Itoa(pid), "fd")
	ents, _ := os.ReadDir(dir)
	out := map[string]int64{}
	for _, e := range ents {
		fi, err := os.Stat(filepath.Join(dir, e.Name()))
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "/") || strings.HasSuffix(target, " (deleted)") {
			continue
		}
		out[target] = fi.Size()
	}
	return out
}

// privateMemory reads Private_Clean + Private_Dirty from smaps_rollup.
func privateMemory(procRoot string, pid int) uint64 {
	f, err := os.Open(filepath.Join(procRoot, strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return 0
	}
	defer f.Close()
	var kb uint64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "Private_Clean:") || strings.HasPrefix(line, "Private_Dirty:") {
			fs := strings.Fields(line)
			if len(fs) >= 2 {
				n, _ := strconv.ParseUint(fs[1], 10, 64)
				kb += n
			}
		}
	}
	return kb << 10
}

// statFields returns the fields of /proc/PID/stat after the command
// name: field 3 (state) first.
func statFields(procRoot string, pid int) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return nil, errors.New("malformed stat")
	}
	return strings.Fields(string(b[i+1:])), nil
}

// procState returns the state letter of pid (R, S, T, Z, ...).
func procState(procRoot string, pid int) (byte, error) {
	f, err := statFields(procRoot, pid)
	if err != nil {
		return 0, err
	}
	if len(f) == 0 || len(f[0]) != 1 {
		return 0, errors.New("malformed stat")
	}
	return f[0][0], nil
}

// alive reports whether the root task (index 0) of a tree exists, is not a
// zombie, and matches its identity when that is known.
func alive(procRoot string, pid int, id phaul.Identity) bool {
	st, err := procState(procRoot, pid)
	return err == nil && st != 'Z' && st != 'X' && same(procRoot, id, 0, pid)
}

// signalTree sends sig to every task of a tree that matches its identity;
// tasks already gone, or whose PID another process now has, are skipped.
func signalTree(procRoot string, pids []int, id phaul.Identity, sig unix.Signal) error {
	var errs []error
	for i, p := range pids {
		if !same(procRoot, id, i, p) {
			continue
		}
		if err := unix.Kill(p, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("pid %d: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
