package host

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Orphans lists state an agent finds at start that no unfinished
// migration owns, for the operator: work directories under workRoot whose
// migration owns reports false for, and CRIU processes whose parent is
// gone (an agent killed while CRIU ran leaves them to init). Nothing is
// removed or killed: a stopped process or an image may be all that is left
// of somebody's work.
func Orphans(workRoot, procRoot string, owns func(id string) bool) []string {
	var out []string
	ents, _ := os.ReadDir(workRoot)
	for _, e := range ents {
		if e.IsDir() && !owns(e.Name()) {
			out = append(out, fmt.Sprintf("work directory %s belongs to no unfinished migration", filepath.Join(workRoot, e.Name())))
		}
	}
	procs, _ := os.ReadDir(procRoot)
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(procRoot, p.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "criu" {
			continue
		}
		f, err := statFields(procRoot, pid)
		if err != nil || len(f) < 2 || f[1] != "1" {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join(procRoot, p.Name(), "cmdline"))
		out = append(out, fmt.Sprintf("CRIU process %d (%s) has no parent agent", pid, strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))))
	}
	return out
}
