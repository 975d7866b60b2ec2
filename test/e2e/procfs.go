package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ErrNoProcess means no process with the given PID exists in the host.
var ErrNoProcess = errors.New("no such process in host")

// ProcInfo describes one process of a host.
type ProcInfo struct {
	PID       int      // PID as the host sees it
	GlobalPID int      // PID as the test process sees it
	PPID      int      // parent's host PID (0 when the parent is outside the host)
	PGID, SID int      // process group and session, host PIDs
	Comm      string   // command name (/proc/PID/comm)
	State     byte     // R, S, D, T (stopped, e.g. frozen by CRIU), t, Z, ...
	Threads   int      // number of threads
	Cmdline   []string // argv; empty for kernel-side or exiting processes
}

type globalEntry struct {
	global int
	start  uint64 // start time in clock ticks, to notice PID reuse
}

// procStat is what /proc/PID/stat gives.
type procStat struct {
	comm                  string
	state                 byte
	ppid, pgid, sid, nthr int
	start                 uint64
}

func readStat(path string) (procStat, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, err
	}
	s := string(b)
	l, r := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if l < 0 || r < l {
		return procStat{}, fmt.Errorf("%s: malformed", path)
	}
	f := strings.Fields(s[r+1:])
	// f[0] is field 3 (state); starttime is field 22.
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("%s: malformed", path)
	}
	st := procStat{comm: s[l+1 : r], state: f[0][0]}
	st.ppid, _ = strconv.Atoi(f[1])
	st.pgid, _ = strconv.Atoi(f[2])
	st.sid, _ = strconv.Atoi(f[3])
	st.nthr, _ = strconv.Atoi(f[17])
	st.start, _ = strconv.ParseUint(f[19], 10, 64)
	return st, nil
}

// procDir is the host's own /proc (its PID namespace's view), reached from
// the machine through the reaper's root.
func (h *Host) procDir() string { return fmt.Sprintf("/proc/%d/root/proc", h.ReaperPID) }

// Processes lists every process of the host except its reaper. It reads only
// the host's own /proc (plus, for a process not seen before, one scan of the
// machine's /proc to learn its global PID), so it is cheap enough to sample
// every few milliseconds. Processes that exit while being listed are left out.
func (h *Host) Processes() ([]ProcInfo, error) {
	ents, err := os.ReadDir(h.procDir())
	if err != nil {
		return nil, fmt.Errorf("%s: list processes: %w", h.Name, err)
	}
	var out []ProcInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 {
			continue
		}
		pi, err := h.Process(pid)
		if err != nil {
			continue
		}
		out = append(out, pi)
	}
	return out, nil
}

// Process returns one process of the host by its host PID; ErrNoProcess when
// there is none.
func (h *Host) Process(pid int) (ProcInfo, error) {
	dir := filepath.Join(h.procDir(), strconv.Itoa(pid))
	st, err := readStat(filepath.Join(dir, "stat"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return ProcInfo{}, fmt.Errorf("%s: PID %d: %w", h.Name, pid, ErrNoProcess)
		}
		return ProcInfo{}, err
	}
	g, err := h.globalPID(pid, st.start)
	if err != nil {
		return ProcInfo{}, err
	}
	return ProcInfo{
		PID: pid, GlobalPID: g, PPID: st.ppid, PGID: st.pgid, SID: st.sid,
		Comm: st.comm, State: st.state, Threads: st.nthr,
		Cmdline: readCmdline(filepath.Join(dir, "cmdline")),
	}, nil
}

// GlobalPID translates a PID as the host sees it into the PID the test
// process sees (from the NSpid line of /proc/*/status); ErrNoProcess when
// the host has no such process.
func (h *Host) GlobalPID(hostPID int) (int, error) {
	st, err := readStat(filepath.Join(h.procDir(), strconv.Itoa(hostPID), "stat"))
	if err != nil {
		return 0, fmt.Errorf("%s: PID %d: %w", h.Name, hostPID, ErrNoProcess)
	}
	return h.globalPID(hostPID, st.start)
}

func (h *Host) globalPID(hostPID int, start uint64) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e, ok := h.global[hostPID]; ok && e.start == start {
		if st, err := readStat(fmt.Sprintf("/proc/%d/stat", e.global)); err == nil && st.start == start {
			return e.global, nil
		}
	}
	if err := h.scanGlobal(); err != nil {
		return 0, err
	}
	if e, ok := h.global[hostPID]; ok && e.start == start {
		return e.global, nil
	}
	return 0, fmt.Errorf("%s: PID %d: %w", h.Name, hostPID, ErrNoProcess)
}

// scanGlobal refreshes the host-PID-to-global-PID map from the machine's
// /proc. Called with h.mu held.
func (h *Host) scanGlobal() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	m := make(map[int]globalEntry, len(h.global))
	for _, e := range ents {
		g, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ns, err := os.Readlink("/proc/" + e.Name() + "/ns/pid"); err != nil || ns != h.pidns {
			continue
		}
		hp, err := hostPIDOf(g)
		if err != nil {
			continue
		}
		st, err := readStat("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		m[hp] = globalEntry{global: g, start: st.start}
	}
	h.global = m
	return nil
}

// hostPIDOf reads the innermost PID of a process from its NSpid line. Only
// processes whose PID namespace is a host's are asked, so that is the
// host PID.
func hostPIDOf(global int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", global))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			return strconv.Atoi(f[len(f)-1])
		}
	}
	return 0, fmt.Errorf("PID %d: no NSpid", global)
}
