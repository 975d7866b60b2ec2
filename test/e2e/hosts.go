package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Names and addresses of the test bed. Beds serialize on LockFile, so they
// are fixed: at most one bed exists on the machine at a time.
const (
	// LockFile is held (flock) for the whole life of a bed, by whichever test
	// process owns it. Beds of test processes running in parallel (go test
	// ./... runs packages in parallel) wait for each other.
	LockFile = "/run/migrated-e2e.lock"
	// Subnet is the hosts' network; host i (from 0) has address 10.201.0.(i+1).
	Subnet = "10.201.0.0/24"
	// bridge is the bridge's name inside the switch's network namespace.
	bridge = "br0"
	// portPrefix prefixes the switch-side veth of each host ("mge2e-hostA").
	portPrefix = "mge2e-"
	// dirPrefix prefixes the bed's scratch directory under /tmp.
	dirPrefix = "mge2e-h"
	// MaxHosts is the largest n NewHosts accepts.
	MaxHosts = 8
	// RunTimeout bounds a command run by Host.Run.
	RunTimeout = 10 * time.Minute
)

// Host is one simulated host: a PID, mount (with its own /proc), network and
// UTS namespace whose PID 1 is a small reaper. Hosts share the machine's file
// system (the mount namespace is a private copy taken at creation: mounts
// made on the machine afterwards are not seen inside), kernel, clock and
// cgroups.
type Host struct {
	// Name is the host's name and hostname: "hostA", "hostB", ...
	Name string
	// IP is the host's address on eth0: 10.201.0.1, 10.201.0.2, ...
	IP string
	// ReaperPID is the global PID (as the test process sees it) of the
	// host's PID 1.
	ReaperPID int
	// FirstPID is the first PID handed out in the host: 1000 for host A,
	// 2000 for host B, ...
	FirstPID int
	// Dir is the host's scratch directory, short enough for unix socket
	// paths below it (/tmp/mge2e-hNNN/hostA). Removed at teardown.
	Dir string
	// Shared is a scratch directory of the bed, the same for all its hosts
	// (every host sees every path anyway; this one is meant for files that
	// must not depend on where a process runs, such as workload status
	// files). Removed at teardown.
	Shared string

	bed   *bed
	init  *holder // unshare, whose child is the reaper
	pidns string  // readlink /proc/REAPER/ns/pid

	mu     sync.Mutex
	global map[int]globalEntry // host PID -> global PID, checked by start time
}

// bed is what the hosts of one NewHosts call share.
type bed struct {
	t        testing.TB
	owner    string
	lock     *os.File
	dir      string
	hostinit string
	hosts    []*Host
	sw       *holder // holds the switch's network namespace
	seq      atomic.Int64
}

// holder is a process of the bed that lives as long as the test process
// holds the writing end of its lifeline pipe (its fd 3): a host's unshare
// and reaper, or the switch.
type holder struct {
	cmd      *exec.Cmd
	lifeline *os.File
	exited   chan struct{}
}

// startHolder starts a hostinit process (through unshare) with a lifeline
// on fd 3 and waits until it prints "ready".
func startHolder(args ...string) (*holder, error) {
	lr, lw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	rr, rw, err := os.Pipe()
	if err != nil {
		lr.Close()
		lw.Close()
		return nil, err
	}
	defer rr.Close()
	var stderr strings.Builder
	cmd := exec.Command("unshare", args...)
	cmd.ExtraFiles = []*os.File{lr} // fd 3: the lifeline
	cmd.Stdout = rw
	cmd.Stderr = &stderr
	cmd.Dir = "/"
	err = cmd.Start()
	lr.Close()
	rw.Close()
	if err != nil {
		lw.Close()
		return nil, fmt.Errorf("start unshare: %w", err)
	}
	h := &holder{cmd: cmd, lifeline: lw, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(h.exited)
	}()
	rr.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(rr).ReadString('\n')
	if err != nil || line != "ready\n" {
		h.stop()
		return nil, fmt.Errorf("unshare %s did not start (%q, %v): %s", strings.Join(args, " "), line, err,
			strings.TrimSpace(stderr.String()))
	}
	return h, nil
}

// stop closes the lifeline and waits for the holder to exit, killing it
// (and, for a host, its reaper) if it does not.
func (h *holder) stop(alsoKill ...int) error {
	h.lifeline.Close()
	select {
	case <-h.exited:
		return nil
	case <-time.After(10 * time.Second):
	}
	for _, pid := range alsoKill {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	h.cmd.Process.Kill()
	select {
	case <-h.exited:
		return fmt.Errorf("process %d ignored its lifeline; killed", h.cmd.Process.Pid)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("process %d does not die", h.cmd.Process.Pid)
	}
}

var activeBeds struct {
	mu     sync.Mutex
	owners map[string]bool
}

// NewHosts creates n simulated hosts (hostA, hostB, ...) joined by a bridge
// on 10.201.0.0/24 and registers their teardown with t.Cleanup: every process
// in every host is killed, the namespaces and veths vanish with them, the
// scratch directories are removed, whether the test passed, failed or
// panicked. No namespace is named or bind-mounted (ip netns is not used): a
// namespace lives exactly as long as the process holding it. If the test
// process itself is killed, the hosts and the switch still die with it
// (their holders exit when the test process's end of their lifeline pipe
// closes); the scratch directories such a crash leaves are removed by the
// next NewHosts.
//
// Beds are machine-wide exclusive: NewHosts waits for LockFile, so tests
// that use beds in parallel (within or across test processes) run one after
// the other. A test must not call NewHosts while it (or a parent test)
// already holds a bed: that would wait forever, so it fails instead.
//
// NewHosts needs root: it calls RequireRoot.
func NewHosts(t testing.TB, n int) []*Host {
	t.Helper()
	RequireRoot(t)
	if n < 1 || n > MaxHosts {
		t.Fatalf("NewHosts: n=%d, want 1..%d", n, MaxHosts)
	}
	hostinit := buildC(t, "hostinit", hostinitSource)

	b := &bed{t: t, owner: t.Name(), hostinit: hostinit}
	if err := b.claim(); err != nil {
		t.Fatalf("NewHosts: %v", err)
	}
	lock, err := acquireLock(t)
	if err != nil {
		b.release()
		t.Fatalf("NewHosts: %v", err)
	}
	b.lock = lock
	t.Cleanup(b.teardown)

	start := time.Now()
	if err := removeLeftovers(); err != nil {
		t.Fatalf("NewHosts: remove leftovers of an earlier run: %v", err)
	}
	if err := b.build(n); err != nil {
		t.Fatalf("NewHosts: %v", err)
	}
	t.Logf("bed: %d hosts up in %v (dir %s)", n, time.Since(start).Round(time.Millisecond), b.dir)
	return b.hosts
}

// claim records that b's test holds a bed, refusing a nested one.
func (b *bed) claim() error {
	activeBeds.mu.Lock()
	defer activeBeds.mu.Unlock()
	for o := range activeBeds.owners {
		if o == b.owner || strings.HasPrefix(b.owner, o+"/") {
			return fmt.Errorf("test %s already holds a bed (from %s); one bed per test", b.owner, o)
		}
	}
	if activeBeds.owners == nil {
		activeBeds.owners = make(map[string]bool)
	}
	activeBeds.owners[b.owner] = true
	return nil
}

func (b *bed) release() {
	activeBeds.mu.Lock()
	delete(activeBeds.owners, b.owner)
	activeBeds.mu.Unlock()
}

// acquireLock takes LockFile, waiting as long as another bed holds it.
func acquireLock(t testing.TB) (*os.File, error) {
	f, err := os.OpenFile(LockFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open bed lock: %w", err)
	}
	start := time.Now()
	next := 5 * time.Second
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", LockFile, err)
		}
		if w := time.Since(start); w > next {
			t.Logf("bed: waited %v for %s (another test holds a bed)", w.Round(time.Second), LockFile)
			next *= 2
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// removeLeftovers deletes what a crashed earlier bed may have left. The
// caller holds LockFile, so nothing of that kind can belong to a live bed.
func removeLeftovers() error {
	pids, err := staleHolders()
	if err != nil {
		return err
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("stale namespace holders %v did not exit", pids)
		}
		time.Sleep(5 * time.Millisecond)
		if pids, err = staleHolders(); err != nil {
			return err
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	return nil
}

// staleHolders lists the global PIDs of hostinit processes holding a host or
// a switch. They exit with the test process that started them; one still
// running without a live bed is stuck.
func staleHolders() ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		argv := readCmdline(filepath.Join("/proc", e.Name(), "cmdline"))
		if len(argv) >= 2 && filepath.Base(argv[0]) == "hostinit" && (argv[1] == "reaper" || argv[1] == "hold") {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

func readCmdline(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

func (b *bed) build(n int) error {
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		return err
	}
	b.dir = dir
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil {
		return err
	}
	if b.sw, err = startHolder("--net", b.hostinit, "hold"); err != nil {
		return fmt.Errorf("switch: %w", err)
	}
	if err := runStdin("link set lo up\nlink add "+bridge+" type bridge\nlink set "+bridge+" up\n",
		"nsenter", "-t", b.swPID(), "-n", "ip", "-batch", "-"); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		h := &Host{
			Name:     "host" + string(rune('A'+i)),
			IP:       fmt.Sprintf("10.201.0.%d", i+1),
			FirstPID: 1000 * (i + 1),
			Shared:   shared,
			bed:      b,
			global:   make(map[int]globalEntry),
		}
		h.Dir = filepath.Join(dir, h.Name)
		if err := os.Mkdir(h.Dir, 0o755); err != nil {
			return err
		}
		b.hosts = append(b.hosts, h)
		if err := h.boot(b.hostinit); err != nil {
			return fmt.Errorf("%s: %w", h.Name, err)
		}
		if err := h.plug(); err != nil {
			return fmt.Errorf("%s: network: %w", h.Name, err)
		}
	}
	return nil
}

// boot starts the host's namespaces and its reaper.
func (h *Host) boot(hostinit string) error {
	var err error
	h.init, err = startHolder("--pid", "--fork", "--mount", "--mount-proc", "--net", "--uts",
		"--propagation", "private", hostinit, "reaper", h.Name, strconv.Itoa(h.FirstPID))
	if err != nil {
		return err
	}
	kids := childrenOf(h.init.cmd.Process.Pid)
	if len(kids) != 1 {
		return fmt.Errorf("find reaper: unshare has children %v", kids)
	}
	h.ReaperPID = kids[0]
	if h.pidns, err = os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", h.ReaperPID)); err != nil {
		return fmt.Errorf("find reaper: %w", err)
	}
	return nil
}

// swPID is the PID of the process holding the switch's network namespace.
func (b *bed) swPID() string { return strconv.Itoa(b.sw.cmd.Process.Pid) }

// plug connects the host to the switch.
func (h *Host) plug() error {
	port := h.port()
	if err := run("ip", "link", "add", "eth0", "netns", strconv.Itoa(h.ReaperPID), "type", "veth",
		"peer", "name", port, "netns", h.bed.swPID()); err != nil {
		return err
	}
	if err := runStdin(fmt.Sprintf("link set lo up\naddr add %s/24 dev eth0\nlink set eth0 up\n", h.IP),
		"nsenter", "-t", strconv.Itoa(h.ReaperPID), "-n", "ip", "-batch", "-"); err != nil {
		return err
	}
	return h.bed.switchIP("link", "set", port, "master", bridge, "up")
}

// switchIP runs ip in the switch's network namespace.
func (b *bed) switchIP(args ...string) error {
	return run("nsenter", append([]string{"-t", b.swPID(), "-n", "ip"}, args...)...)
}

// port is the name of the host's veth end in the switch namespace.
func (h *Host) port() string { return portPrefix + h.Name }

// teardown kills every host and deletes the switch, reporting (t.Errorf)
// anything it could not remove.
func (b *bed) teardown() {
	t := b.t
	for i := len(b.hosts) - 1; i >= 0; i-- {
		if err := b.hosts[i].stop(); err != nil {
			t.Errorf("bed teardown: %s: %v", b.hosts[i].Name, err)
		}
	}
	if b.sw != nil {
		if err := b.sw.stop(); err != nil {
			t.Errorf("bed teardown: switch: %v", err)
		}
	}
	if b.dir != "" {
		if err := os.RemoveAll(b.dir); err != nil {
			t.Errorf("bed teardown: %v", err)
		}
	}
	if b.lock != nil {
		syscall.Flock(int(b.lock.Fd()), syscall.LOCK_UN)
		b.lock.Close()
	}
	b.release()
}

// stop takes the host down: closing the lifeline makes the reaper exit, and
// the kernel kills every process of a PID namespace whose PID 1 exits.
func (h *Host) stop() error {
	if h.init == nil {
		return nil
	}
	return h.init.stop(h.ReaperPID)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func runStdin(stdin string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s <<%q: %v: %s", name, strings.Join(args, " "), stdin, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Command returns a command that runs name inside all of the host's
// namespaces (nsenter -t REAPER -a). It starts in the host's "/" (entering a
// mount namespace resets the working directory; cmd.Dir only affects nsenter
// itself); use CommandDir for another directory. Cancelling ctx, or killing
// nsenter by any other means, kills the command too. Stdio and environment
// are the cmd's as usual; set no ExtraFiles (an fd from the machine's mount
// namespace makes CRIU refuse to dump a process that inherits it).
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return h.CommandDir(ctx, "", name, args...)
}

// CommandDir is Command with working directory dir inside the host ("" for
// the host's "/").
func (h *Host) CommandDir(ctx context.Context, dir, name string, args ...string) *exec.Cmd {
	if dir == "" {
		dir = "-"
	}
	a := append([]string{"-t", strconv.Itoa(h.ReaperPID), "-a", h.bed.hostinit, "exec", dir, name}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", a...)
	// Kill the command, not nsenter: nsenter then reaps it and exits. (A
	// command orphaned by nsenter's death dies too, but is left for the
	// machine's init to reap, which can take a while.)
	cmd.Cancel = func() error {
		kids := childrenOf(cmd.Process.Pid)
		if len(kids) == 0 {
			return cmd.Process.Kill()
		}
		for _, k := range kids {
			syscall.Kill(k, syscall.SIGKILL)
		}
		return nil
	}
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

// childrenOf lists the children of a (single-threaded) process by global PID.
func childrenOf(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var kids []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			kids = append(kids, n)
		}
	}
	return kids
}

// Run runs name inside the host (see Command) and returns its combined
// output; it fails the test, showing the output, when the command fails or
// runs longer than RunTimeout. It works in cleanup functions too (it does
// not use t.Context, which is cancelled before them).
func (h *Host) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), RunTimeout)
	defer cancel()
	out, err := h.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %s %s: %v\n%s", h.Name, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Shape limits the rate of the host's outgoing traffic on eth0 with a token
// bucket filter (tc tbf), e.g. rate "1gbit" or "200mbit". Shape both hosts
// for a symmetric link. The limit is removed at the end of the test.
func (h *Host) Shape(t testing.TB, rate string) {
	t.Helper()
	h.Run(t, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")
	t.Cleanup(func() {
		// The host may already be gone (its bed's teardown ran first).
		exec.Command("nsenter", "-t", strconv.Itoa(h.ReaperPID), "-n", "tc", "qdisc", "del", "dev", "eth0", "root").Run()
	})
}

// LinkDown cuts the host off the switch by taking down its port on the
// bridge: the host's eth0 loses carrier but keeps its address and routes,
// so its packets are dropped silently, as with a pulled cable (no error
// reaches the sender's sockets). LinkUp reconnects it.
func (h *Host) LinkDown(t testing.TB) {
	t.Helper()
	if err := h.bed.switchIP("link", "set", h.port(), "down"); err != nil {
		t.Fatalf("%s: link down: %v", h.Name, err)
	}
}

// LinkUp reconnects a host cut off by LinkDown. It returns once both ends
// of the link report it operational (the kernel applies carrier changes
// asynchronously, up to a second later).
func (h *Host) LinkUp(t testing.TB) {
	t.Helper()
	if err := h.bed.switchIP("link", "set", h.port(), "up"); err != nil {
		t.Fatalf("%s: link up: %v", h.Name, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		port, err1 := exec.Command("nsenter", "-t", h.bed.swPID(), "-n", "ip", "-o", "link", "show", "dev", h.port()).Output()
		eth0, err2 := exec.Command("nsenter", "-t", strconv.Itoa(h.ReaperPID), "-n", "ip", "-o", "link", "show", "dev", "eth0").Output()
		if err1 == nil && err2 == nil && strings.Contains(string(port), "state UP") && strings.Contains(string(eth0), "state UP") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: link not up: %v %v\n%s%s", h.Name, err1, err2, port, eth0)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
