package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/migrated/migrated/test/e2e"
)

// clockTick is the kernel's USER_HZ, the unit of times in /proc/PID/stat.
const clockTick = 100

// cpuTimes are a process's own and its waited-for children's CPU times.
type cpuTimes struct {
	Self, Children time.Duration
}

// readCPU reads /proc/PID/stat of a global PID.
func readCPU(pid int) (cpuTimes, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return cpuTimes{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return cpuTimes{}, fmt.Errorf("/proc/%d/stat: no comm", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return cpuTimes{}, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var v [4]int64
	for k := range v {
		if v[k], err = strconv.ParseInt(f[11+k], 10, 64); err != nil {
			return cpuTimes{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
	}
	tick := time.Second / clockTick
	return cpuTimes{Self: time.Duration(v[0]+v[1]) * tick, Children: time.Duration(v[2]+v[3]) * tick}, nil
}

// readHWM reads VmHWM (peak resident memory) of a global PID, in bytes.
func readHWM(pid int) (uint64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmHWM", pid)
}

// resetHWM resets VmHWM of a global PID to its current RSS.
func resetHWM(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// txBytes returns the bytes the host's eth0 sent so far.
func txBytes(h *e2e.Host) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/dev", h.ReaperPID))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(name) != "eth0" {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 16 {
			return 0, fmt.Errorf("%s: net/dev eth0: %d fields", h.Name, len(f))
		}
		return strconv.ParseUint(f[8], 10, 64)
	}
	return 0, fmt.Errorf("%s: no eth0 in net/dev", h.Name)
}

// listening reports whether a TCP socket in h listens on port.
func listening(h *e2e.Host, port int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", h.ReaperPID))
	if err != nil {
		return false
	}
	want := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// waitListening waits until something in h listens on port.
func waitListening(h *e2e.Host, port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !listening(h, port) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: nothing listens on port %d after %v", h.Name, port, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// waitPortFree waits until nothing in h listens on port.
func waitPortFree(h *e2e.Host, port int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for listening(h, port) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: port %d still in use after %v", h.Name, port, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
