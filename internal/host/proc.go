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
	return t, nil
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

// procState returns the state letter of pid (R, S, T, Z, ...).
func procState(procRoot string, pid int) (byte, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, errors.New("malformed stat")
	}
	return b[i+2], nil
}

func alive(procRoot string, pid int) bool {
	st, err := procState(procRoot, pid)
	return err == nil && st != 'Z' && st != 'X'
}

// signalTree sends sig to every task of a tree; tasks already gone are
// not an error.
func signalTree(pids []int, sig unix.Signal) error {
	var errs []error
	for _, p := range pids {
		if err := unix.Kill(p, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("pid %d: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
