package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bedTrace is what a bed's teardown must remove.
type bedTrace struct {
	dir     string
	reapers []int
	nsIDs   []string // "pid:[...]", "net:[...]" of every host
}

func traceOf(t *testing.T, hs []*Host) bedTrace {
	t.Helper()
	tr := bedTrace{dir: filepath.Dir(hs[0].Dir)}
	sw := hs[0].bed.sw.cmd.Process.Pid
	id, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", sw))
	if err != nil {
		t.Fatal(err)
	}
	tr.nsIDs = append(tr.nsIDs, id)
	tr.reapers = append(tr.reapers, sw)
	for _, h := range hs {
		tr.reapers = append(tr.reapers, h.ReaperPID)
		for _, ns := range []string{"pid", "net", "mnt", "uts"} {
			id, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", h.ReaperPID, ns))
			if err != nil {
				t.Fatal(err)
			}
			tr.nsIDs = append(tr.nsIDs, id)
		}
	}
	return tr
}

// checkNothingLeft fails unless every trace of a torn-down bed is gone:
// network namespaces, veths, mounts, processes of the hosts' and the
// switch's namespaces, the scratch directory. It holds the bed lock while it looks,
// so no other bed can be mistaken for a leftover.
func checkNothingLeft(t *testing.T, tr bedTrace) {
	t.Helper()
	lock, err := acquireLock(t)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil || strings.Contains(string(out), "mge2e") {
		t.Errorf("ip netns list after teardown: %v\n%s", err, out)
	}
	out, err = exec.Command("ip", "-o", "link").CombinedOutput()
	if err != nil || strings.Contains(string(out), portPrefix) {
		t.Errorf("ip link after teardown: %v\n%s", err, out)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil || strings.Contains(string(mounts), "mge2e") || strings.Contains(string(mounts), tr.dir) {
		t.Errorf("mounts after teardown: %v\n%s", err, mounts)
	}
	if _, err := os.Stat(tr.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bed directory %s after teardown: %v", tr.dir, err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		for _, ns := range []string{"pid", "net", "mnt", "uts"} {
			id, err := os.Readlink("/proc/" + e.Name() + "/ns/" + ns)
			if err == nil && slices.Contains(tr.nsIDs, id) {
				t.Errorf("process %s (%q) is still in a host's namespace %s after teardown",
					e.Name(), readCmdline("/proc/"+e.Name()+"/cmdline"), id)
			}
		}
	}
	for _, r := range tr.reapers {
		if argv := readCmdline(fmt.Sprintf("/proc/%d/cmdline", r)); len(argv) > 1 && (argv[1] == "reaper" || argv[1] == "hold") {
			t.Errorf("namespace holder %d (%s) still runs after teardown", r, argv[1])
		}
	}
}

func TestBedIsolation(t *testing.T) {
	RequireRoot(t)
	var tr bedTrace
	t.Run("bed", func(t *testing.T) {
		hs := NewHosts(t, 3)
		tr = traceOf(t, hs)
		machine, _ := os.Hostname()

		// Each host is its own PID, mount, network and UTS namespace.
		seen := map[string]string{}
		for _, ns := range []string{"pid", "net", "mnt", "uts"} {
			self, _ := os.Readlink("/proc/self/ns/" + ns)
			seen[self] = "the machine"
			for _, h := range hs {
				id, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", h.ReaperPID, ns))
				if other, dup := seen[id]; dup {
					t.Errorf("%s shares its %s namespace with %s", h.Name, ns, other)
				}
				seen[id] = h.Name
			}
		}

		var procs []*Proc
		for i, h := range hs {
			if got := strings.TrimSpace(h.Run(t, "hostname")); got != h.Name || got == machine {
				t.Errorf("%s: hostname %q", h.Name, got)
			}
			if want := fmt.Sprintf("10.201.0.%d", i+1); h.IP != want {
				t.Errorf("%s: IP %s, want %s", h.Name, h.IP, want)
			}
			// Only lo and eth0, with the host's address.
			links := h.Run(t, "ip", "-o", "-4", "addr", "show")
			if !strings.Contains(links, "eth0") || !strings.Contains(links, h.IP+"/24") || strings.Count(links, "\n") != 2 {
				t.Errorf("%s: addresses:\n%s", h.Name, links)
			}
			p := StartMemhog(t, h, MemhogOptions{MemMiB: 1, Listen: 7000})
			if p.PID < h.FirstPID || p.PID >= h.FirstPID+1000 {
				t.Errorf("%s: workload PID %d outside %d..%d", h.Name, p.PID, h.FirstPID, h.FirstPID+999)
			}
			procs = append(procs, p)
		}

		// A host sees only its own processes.
		for i, h := range hs {
			out := h.Run(t, "ps", "-e", "-o", "pid=")
			var pids []int
			for _, f := range strings.Fields(out) {
				n, _ := strconv.Atoi(f)
				pids = append(pids, n)
			}
			if !slices.Contains(pids, 1) || !slices.Contains(pids, procs[i].PID) {
				t.Errorf("%s: ps shows %v, want 1 and %d among them", h.Name, pids, procs[i].PID)
			}
			for _, n := range pids {
				if n != 1 && (n < h.FirstPID || n >= h.FirstPID+1000) {
					t.Errorf("%s: ps shows PID %d of another range: %v", h.Name, n, pids)
				}
			}
			ps, err := h.Processes()
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range ps {
				for j, p := range procs {
					g, _ := p.GlobalPID()
					if j != i && q.GlobalPID == g {
						t.Errorf("%s lists %s's process %d", h.Name, hs[j].Name, g)
					}
				}
			}
		}

		// Every host reaches every other over 10.201.0.0/24.
		for _, from := range hs {
			for _, to := range hs {
				if from != to {
					tcpCounter(t, from, to.IP, 7000)
				}
			}
		}

		// A cut link drops traffic silently; LinkUp restores it.
		a, b := hs[0], hs[1]
		b.LinkDown(t)
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		out, err := a.Command(ctx, "bash", "-c", "exec 3<>/dev/tcp/"+b.IP+"/7000 && cat <&3").CombinedOutput()
		cancel()
		if err == nil {
			t.Errorf("%s reached %s through a link that is down: %q", a.Name, b.Name, out)
		}
		b.LinkUp(t)
		tcpCounter(t, a, b.IP, 7000)

		// Shape installs a tbf qdisc that goes away at the end of its test.
		t.Run("shape", func(t *testing.T) {
			a.Shape(t, "100mbit")
			if q := a.Run(t, "tc", "qdisc", "show", "dev", "eth0"); !strings.Contains(q, "tbf") || !strings.Contains(q, "100Mbit") {
				t.Errorf("qdisc after Shape: %s", q)
			}
		})
		if q := a.Run(t, "tc", "qdisc", "show", "dev", "eth0"); strings.Contains(q, "tbf") {
			t.Errorf("qdisc after the shaping test ended: %s", q)
		}
	})
	if tr.dir == "" {
		return // the bed did not come up; the subtest said why
	}
	checkNothingLeft(t, tr)
}

func TestStartedProcess(t *testing.T) {
	hs := NewHosts(t, 1)
	h := hs[0]
	p := h.Start(t, StartOptions{}, "sleep", "4242")
	g, err := p.GlobalPID()
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	// A session leader, child of the host's reaper, not of the test process.
	if info.PPID != 1 || info.SID != p.PID || info.PGID != p.PID || info.Comm != "sleep" {
		t.Errorf("started process: %+v; want parent 1, its own session and group, comm sleep", info)
	}
	st, err := readStat(fmt.Sprintf("/proc/%d/stat", g))
	if err != nil || st.ppid != h.ReaperPID {
		t.Errorf("global parent of %d: %d (%v), want the reaper %d", g, st.ppid, err, h.ReaperPID)
	}
	if hp, err := hostPIDOf(g); err != nil || hp != p.PID {
		t.Errorf("NSpid of global %d: %d, %v; want %d", g, hp, err, p.PID)
	}
	// Only stdin, stdout and stderr; working directory h.Dir. The spawner's
	// close-on-exec error pipe may still be seen for an instant while the
	// kernel completes the exec; a leaked fd stays.
	var names []string
	for deadline := time.Now().Add(2 * time.Second); ; {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", g))
		if err != nil {
			t.Fatal(err)
		}
		names = names[:0]
		for _, fd := range fds {
			target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", g, fd.Name()))
			names = append(names, fd.Name()+"="+target)
		}
		if len(names) == 3 && strings.HasPrefix(names[0], "0=") && strings.HasPrefix(names[1], "1=") && strings.HasPrefix(names[2], "2=") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("open fds %v, want 0 1 2", names)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if out, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", g)); out != p.Stdout {
		t.Errorf("stdout is %s, want %s", out, p.Stdout)
	}
	if cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", g)); cwd != h.Dir {
		t.Errorf("cwd %s, want %s", cwd, h.Dir)
	}

	// The state follows the process: stopped, then gone.
	if err := p.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitState(t, p, 'T')
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, p)
	if _, err := h.GlobalPID(p.PID); !errors.Is(err, ErrNoProcess) {
		t.Errorf("GlobalPID of a dead process: %v, want ErrNoProcess", err)
	}

	// Commands start in the host's / or the directory given, and stdout works.
	if out := strings.TrimSpace(h.Run(t, "pwd")); out != "/" {
		t.Errorf("Command runs in %q, want /", out)
	}
	out, err := h.CommandDir(t.Context(), h.Dir, "pwd").Output()
	if err != nil || strings.TrimSpace(string(out)) != h.Dir {
		t.Errorf("CommandDir runs in %q (%v), want %s", out, err, h.Dir)
	}
	// A failing start reports the error.
	cmd := exec.Command("nsenter", "-t", strconv.Itoa(h.ReaperPID), "-a", h.bed.hostinit, "spawn", h.Dir,
		filepath.Join(h.Dir, "x.out"), filepath.Join(h.Dir, "x.err"), "/nonexistent/program")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "No such file") {
		t.Errorf("spawning a missing program: %v: %s", err, out)
	}
}

func TestCommandCancelKillsInsideProcess(t *testing.T) {
	hs := NewHosts(t, 1)
	h := hs[0]
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	cmd := h.Command(ctx, "sleep", "4343")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	deadline := time.Now().Add(30 * time.Second)
	for pid == 0 {
		ps, err := h.Processes()
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range ps {
			if slices.Equal(q.Cmdline, []string{"sleep", "4343"}) {
				pid = q.PID
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("sleep 4343 did not appear in the host")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	cmd.Wait()
	waitGone(t, &Proc{Host: h, PID: pid})
}

func waitState(t *testing.T, p *Proc, state byte) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := p.Info()
		if err == nil && info.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s PID %d: state %c (%v), want %c", p.Host.Name, p.PID, info.State, err, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// holdBedEnv makes the test binary, run by TestBedDiesWithTestProcess, build
// a bed, print its reapers and wait to be killed.
const holdBedEnv = "MIGRATED_E2E_HOLD_BED"

func TestBedDiesWithTestProcess(t *testing.T) {
	if os.Getenv(holdBedEnv) == "1" {
		hs := NewHosts(t, 2)
		for _, h := range hs {
			h.Start(t, StartOptions{}, "sleep", "4444")
		}
		ids := []string{strconv.Itoa(hs[0].bed.sw.cmd.Process.Pid)}
		for _, h := range hs {
			ids = append(ids, strconv.Itoa(h.ReaperPID))
		}
		fmt.Printf("reapers=%s dir=%s\n" /* the switch's holder first */, strings.Join(ids, ","), filepath.Dir(hs[0].Dir))
		time.Sleep(time.Hour)
		return
	}
	RequireRoot(t)

	// A test process holding a bed is killed without any chance to clean up.
	cmd := exec.Command(os.Args[0], "-test.run=^TestBedDiesWithTestProcess$", "-test.v")
	cmd.Env = append(os.Environ(), holdBedEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var line string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "reapers=") {
			line = sc.Text()
			break
		}
	}
	if line == "" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("bed holder printed no reapers")
	}
	var reapers []int
	var dir string
	for _, f := range strings.Fields(line) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "reapers":
			for _, s := range strings.Split(v, ",") {
				n, _ := strconv.Atoi(s)
				reapers = append(reapers, n)
			}
		case "dir":
			dir = v
		}
	}
	var nsIDs []string
	for i, r := range reapers {
		namespaces := []string{"net", "pid", "mnt", "uts"}
		if i == 0 { // the switch has only its network namespace
			namespaces = namespaces[:1]
		}
		for _, ns := range namespaces {
			id, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", r, ns))
			if err != nil {
				t.Fatal(err)
			}
			nsIDs = append(nsIDs, id)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	os.RemoveAll(filepath.Join(os.TempDir(), binPrefix+strconv.Itoa(cmd.Process.Pid)))

	// Its hosts die with it: each reaper sees its lifeline close.
	deadline := time.Now().Add(30 * time.Second)
	for _, r := range reapers {
		for {
			argv := readCmdline(fmt.Sprintf("/proc/%d/cmdline", r))
			if len(argv) < 2 || argv[1] != "reaper" && argv[1] != "hold" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("namespace holder %d (%s) outlived its test process", r, argv[1])
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// The next bed removes what the crash left (its directory) and works.
	var tr bedTrace
	t.Run("next", func(t *testing.T) {
		hs := NewHosts(t, 2)
		tr = traceOf(t, hs)
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("crashed bed's directory %s: %v", dir, err)
		}
		StartMemhog(t, hs[1], MemhogOptions{MemMiB: 1, Listen: 7000})
		tcpCounter(t, hs[0], hs[1].IP, 7000)
	})
	if tr.dir == "" {
		return
	}
	tr.nsIDs = append(tr.nsIDs, nsIDs...)
	tr.reapers = append(tr.reapers, reapers...)
	checkNothingLeft(t, tr)
}

func TestRequireInCI(t *testing.T) {
	for _, tc := range []struct {
		ci               string
		wantFail, wantSk bool
	}{
		{"true", true, false},
		{"", false, true},
		{"false", false, true},
	} {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			r := &recordTB{TB: t}
			missing(r, "criu not found")
			if r.failed != tc.wantFail || r.skipped != tc.wantSk {
				t.Errorf("CI=%q: failed=%v skipped=%v, want %v %v", tc.ci, r.failed, r.skipped, tc.wantFail, tc.wantSk)
			}
			if !strings.Contains(r.msg, "criu not found") || strings.Contains(r.msg, "\n") {
				t.Errorf("message %q: want the reason on one line", r.msg)
			}
		})
	}
}

// recordTB records Fatalf and Skip instead of acting on them.
type recordTB struct {
	testing.TB
	failed, skipped bool
	msg             string
}

func (r *recordTB) Helper() {}
func (r *recordTB) Fatalf(format string, args ...any) {
	r.failed, r.msg = true, fmt.Sprintf(format, args...)
}
func (r *recordTB) Skip(args ...any) { r.skipped, r.msg = true, fmt.Sprint(args...) }
