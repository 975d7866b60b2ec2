package criurpc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrNoProcess means the process a tree helper was given does not exist.
var ErrNoProcess = errors.New("no such process")

// TreePIDs lists the processes of the tree rooted at root (root first),
// from /proc/PID/task/TID/children in the caller's PID namespace. The list
// is exact only while the tree cannot fork, e.g. while it is stopped.
func TreePIDs(root int) ([]int, error) {
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", root)); err != nil {
		return nil, fmt.Errorf("process %d: %w", root, ErrNoProcess)
	}
	seen := map[int]bool{root: true}
	pids := []int{root}
	for i := 0; i < len(pids); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pids[i]))
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				continue // the thread or process went away
			}
			for _, f := range strings.Fields(string(b)) {
				pid, err := strconv.Atoi(f)
				if err != nil || seen[pid] {
					continue
				}
				seen[pid] = true
				pids = append(pids, pid)
			}
		}
	}
	return pids, nil
}

// ResumeTree sends SIGCONT to every process of the tree rooted at root:
// this resumes a tree that a dump or restore with LeaveStopped left
// stopped.
func ResumeTree(root int) error {
	return signalTree(root, unix.SIGCONT)
}

// KillTree sends SIGKILL to every process of the tree rooted at root, e.g.
// the stopped source of a dump with LeaveStopped once its copy runs
// elsewhere. The processes' parents reap them; the caller reaps only its own
// children.
func KillTree(root int) error {
	return signalTree(root, unix.SIGKILL)
}

func signalTree(root int, sig unix.Signal) error {
	pids, err := TreePIDs(root)
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		if err := unix.Kill(pid, sig); err != nil && err != unix.ESRCH {
			errs = append(errs, fmt.Errorf("%s to %d: %w", sig, pid, err))
		}
	}
	return errors.Join(errs...)
}
