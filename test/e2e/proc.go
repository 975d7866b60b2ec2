package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// StartOptions tunes Host.Start. The zero value is fine.
type StartOptions struct {
	// Dir is the process's working directory and where its stdout and
	// stderr files go; default the host's Dir.
	Dir string
	// Env is added to the test process's environment.
	Env []string
	// StatusFile is the workload status file the process writes (see
	// WorkloadStatus); it is recorded in Proc.StatusFile for Status, WaitStatus
	// and Verify. Start does not pass it to the process.
	StatusFile string
}

// Proc is a long-running process started in a host by Host.Start.
type Proc struct {
	// Host is the host the process runs in. After the process was moved
	// (checkpointed and restored elsewhere), On gives a Proc for its new host.
	Host *Host
	// PID is the process's PID as its host sees it; a migration keeps it.
	PID int
	// Args is the command line (name first).
	Args []string
	// Stdout and Stderr are the files its output is appended to.
	Stdout, Stderr string
	// StatusFile is StartOptions.StatusFile.
	StatusFile string
}

// Start starts a long-running process in the host: a session leader
// (setsid, so CRIU can dump it without --shell-job) with stdin from
// /dev/null, stdout and stderr appended to files in o.Dir (default h.Dir),
// no other fds, working directory o.Dir. The process is re-parented to the
// host's reaper at once: it is not a child of the test process, and exec.Cmd
// knows nothing of it. At the end of the test every process of its session is
// killed in every host of the bed (wherever a migration took it).
func (h *Host) Start(t testing.TB, o StartOptions, name string, args ...string) *Proc {
	t.Helper()
	dir := o.Dir
	if dir == "" {
		dir = h.Dir
	}
	seq := h.bed.seq.Add(1)
	base := fmt.Sprintf("%s.%d", filepath.Base(name), seq)
	p := &Proc{
		Host:       h,
		Args:       append([]string{name}, args...),
		Stdout:     filepath.Join(dir, base+".out"),
		Stderr:     filepath.Join(dir, base+".err"),
		StatusFile: o.StatusFile,
	}
	a := append([]string{"-t", strconv.Itoa(h.ReaperPID), "-a", h.bed.hostinit, "spawn", dir, p.Stdout, p.Stderr, name}, args...)
	cmd := exec.Command("nsenter", a...)
	cmd.Env = append(os.Environ(), o.Env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: start %s: %v: %s", h.Name, strings.Join(p.Args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	if p.PID, err = strconv.Atoi(strings.TrimSpace(string(out))); err != nil {
		t.Fatalf("%s: start %s: bad PID %q", h.Name, name, out)
	}
	t.Cleanup(p.killEverywhere)
	return p
}

// On returns the same process (same host PID, files and status file) as it
// runs in host h, e.g. after it was restored there.
func (p *Proc) On(h *Host) *Proc {
	q := *p
	q.Host = h
	return &q
}

// GlobalPID returns the process's PID as the test process sees it.
func (p *Proc) GlobalPID() (int, error) { return p.Host.GlobalPID(p.PID) }

// Signal sends sig to the process in its host.
func (p *Proc) Signal(sig syscall.Signal) error {
	g, err := p.GlobalPID()
	if err != nil {
		return err
	}
	return syscall.Kill(g, sig)
}

// Kill sends SIGKILL to the process in its host.
func (p *Proc) Kill() error { return p.Signal(syscall.SIGKILL) }

// Info returns the process's entry in its host's process table;
// ErrNoProcess when it does not exist there.
func (p *Proc) Info() (ProcInfo, error) { return p.Host.Process(p.PID) }

// killEverywhere kills every process of p's session in every host of the bed.
func (p *Proc) killEverywhere() {
	for _, h := range p.Host.bed.hosts {
		ps, err := h.Processes()
		if err != nil {
			continue // host already gone
		}
		for _, q := range ps {
			if q.SID == p.PID {
				syscall.Kill(q.GlobalPID, syscall.SIGKILL)
			}
		}
	}
}
