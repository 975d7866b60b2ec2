package criurpc

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/migrated/migrated/test/e2e"
)

// helperCmd prepares the test binary as a helper running req inside h.
func helperCmd(t *testing.T, h *e2e.Host, req helperRequest) (*bufio.Scanner, func() error, func()) {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	cmd := h.Command(t.Context(), os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+string(b))
	cmd.Stderr = testWriter{t}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return bufio.NewScanner(stdout), cmd.Wait, func() { stdin.Close() }
}

// readResult reads the helper's next answer and fails the test on an
// error.
func readResult(t *testing.T, h *e2e.Host, sc *bufio.Scanner, op string) helperResult {
	t.Helper()
	if !sc.Scan() {
		t.Fatalf("%s in %s: helper gave no answer: %v", op, h.Name, sc.Err())
	}
	var res helperResult
	if err := json.Unmarshal(sc.Bytes(), &res); err != nil {
		t.Fatalf("%s in %s: helper answered %q: %v", op, h.Name, sc.Text(), err)
	}
	if res.Err != "" {
		t.Fatalf("%s in %s: %s", op, h.Name, res.Err)
	}
	return res
}

// runHelperIn runs one operation inside h and returns its result.
func runHelperIn(t *testing.T, h *e2e.Host, req helperRequest) helperResult {
	t.Helper()
	sc, wait, closeIn := helperCmd(t, h, req)
	closeIn()
	res := readResult(t, h, sc, req.Op)
	if err := wait(); err != nil {
		t.Fatalf("%s in %s: helper: %v", req.Op, h.Name, err)
	}
	return res
}

// waitHostStopped waits until p is stopped in its host (see waitStopped).
func waitHostStopped(t *testing.T, p *e2e.Proc) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		info, err := p.Info()
		if err == nil && info.State == 'T' {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("source after the dump: %+v, %v; want it stopped", info, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// checkMoved checks that p, dumped and stopped in its host, runs in dst
// with the same PID, its counter continuing and its memory intact, and that
// it is the child of dst's init (the helper that restored it has exited).
func checkMoved(t *testing.T, p *e2e.Proc, dst *e2e.Host, before, frozen e2e.WorkloadStatus, restoredPID int) {
	t.Helper()
	if restoredPID != p.PID {
		t.Fatalf("restored PID %d in %s, want %d", restoredPID, dst.Name, p.PID)
	}
	q := p.On(dst)
	qi, err := q.Info()
	if err != nil {
		t.Fatalf("restored process in %s: %v", dst.Name, err)
	}
	if qi.PPID != 1 {
		t.Fatalf("restored process in %s has parent %d, want the host's init", dst.Name, qi.PPID)
	}
	e2e.WaitStatus(t, q, func(s e2e.WorkloadStatus) bool { return s.PID == p.PID && s.Counter > frozen.Counter+50 }, time.Minute)
	after := e2e.Verify(t, q)
	if after.ColdSum != before.ColdSum {
		t.Fatalf("checksum %s after the move, %s before", after.ColdSum, before.ColdSum)
	}
}

func TestDumpRestoreAcrossHosts(t *testing.T) {
	e2e.RequireCRIU(t)
	hs := e2e.NewHosts(t, 2)
	a, b := hs[0], hs[1]
	p := e2e.StartMemhog(t, a, e2e.MemhogOptions{MemMiB: 32, HotMiB: 4})
	before := e2e.Verify(t, p)
	img := filepath.Join(a.Dir, "img")
	if err := os.Mkdir(img, 0o755); err != nil {
		t.Fatal(err)
	}

	d := runHelperIn(t, a, helperRequest{Op: "dump", ImagesDir: img, PID: p.PID, LeaveStopped: true})
	waitHostStopped(t, p)
	frozen, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	r := runHelperIn(t, b, helperRequest{Op: "restore", ImagesDir: img})
	// The stopped source is still there while its copy runs.
	if info, err := p.Info(); err != nil || info.State != 'T' {
		t.Fatalf("source after the restore: %+v, %v; want it stopped", info, err)
	}
	checkMoved(t, p, b, before, frozen, r.PID)
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("moved PID %d from %s to %s: %d pages written, %d restored", p.PID, a.Name, b.Name, d.PagesWritten, r.PagesRestored)
}

func TestPageServerAcrossHosts(t *testing.T) {
	e2e.RequireCRIU(t)
	hs := e2e.NewHosts(t, 2)
	a, b := hs[0], hs[1]
	p := e2e.StartMemhog(t, a, e2e.MemhogOptions{MemMiB: 32, HotMiB: 4})
	before := e2e.Verify(t, p)
	img, dst := filepath.Join(a.Dir, "img"), filepath.Join(b.Dir, "img")
	for _, d := range []string{img, dst} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	// The page server listens in B; the dump in A sends its pages there.
	sc, wait, askWait := helperCmd(t, b, helperRequest{Op: "page-server", ImagesDir: dst, Address: b.IP})
	ps := readResult(t, b, sc, "page-server")
	if ps.Port <= 0 {
		t.Fatalf("page server in %s reports port %d", b.Name, ps.Port)
	}
	d := runHelperIn(t, a, helperRequest{Op: "dump", ImagesDir: img, PID: p.PID, LeaveStopped: true, Address: b.IP, Port: ps.Port})
	frozen, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	askWait()
	readResult(t, b, sc, "page-server wait")
	if err := wait(); err != nil {
		t.Fatalf("page-server helper: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(img, "pages-*.img")); len(m) != 0 {
		t.Fatalf("dump in %s wrote pages locally: %v", a.Name, m)
	}
	// B has the pages; the other images travel separately.
	copyMissing(t, img, dst)
	r := runHelperIn(t, b, helperRequest{Op: "restore", ImagesDir: dst})
	checkMoved(t, p, b, before, frozen, r.PID)
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("moved PID %d from %s to %s through a page server in %s: %d pages", p.PID, a.Name, b.Name, b.Name, d.PagesWritten)
}

// minPipeSize is what CRIU's lazy pages need of fs.pipe-max-size where root
// lacks CAP_SYS_RESOURCE (its 4 MiB pipes fail silently otherwise).
const minPipeSize = 4 << 20

// raisePipeMaxSize makes sure fs.pipe-max-size is at least minPipeSize
// during the test and restores it afterwards.
func raisePipeMaxSize(t *testing.T) {
	t.Helper()
	const path = "/proc/sys/fs/pipe-max-size"
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	old := strings.TrimSpace(string(b))
	if n, err := strconv.Atoi(old); err == nil && n >= minPipeSize {
		return
	}
	if err := os.WriteFile(path, []byte(strconv.Itoa(minPipeSize)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(path, []byte(old), 0o644) })
}

func TestLazyPagesAcrossHosts(t *testing.T) {
	e2e.RequireCRIU(t)
	raisePipeMaxSize(t)
	hs := e2e.NewHosts(t, 2)
	a, b := hs[0], hs[1]
	p := e2e.StartMemhog(t, a, e2e.MemhogOptions{MemMiB: 32, HotMiB: 4})
	before := e2e.Verify(t, p)
	img, dst := filepath.Join(a.Dir, "img"), filepath.Join(b.Dir, "img")
	for _, d := range []string{img, dst} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const port = 27027 // in host A's own network namespace

	dsc, dwait, dclose := helperCmd(t, a, helperRequest{Op: "lazy-dump", ImagesDir: img, PID: p.PID, Port: port})
	dclose()
	if r := readResult(t, a, dsc, "lazy-dump"); !r.Ready {
		t.Fatalf("lazy dump answered %+v before its page server was ready", r)
	}
	frozen, err := p.Status()
	if err != nil {
		t.Fatal(err)
	}
	// The images without the lazy memory go to B; the memory follows on
	// demand.
	copyMissing(t, img, dst)
	rsc, rwait, rclose := helperCmd(t, b, helperRequest{Op: "lazy-restore", ImagesDir: dst, Address: a.IP, Port: port})
	rclose()
	r := readResult(t, b, rsc, "lazy-restore")
	checkMoved(t, p, b, before, frozen, r.PID)
	readResult(t, b, rsc, "lazy-pages")
	if err := rwait(); err != nil {
		t.Fatalf("lazy-restore helper: %v", err)
	}
	readResult(t, a, dsc, "lazy-dump")
	if err := dwait(); err != nil {
		t.Fatalf("lazy-dump helper: %v", err)
	}
	// The memory was not in the images: it went lazily. (CRIU's stats do
	// not show it: its lazy page server resets the dump's counters.)
	var local int64
	pages, _ := filepath.Glob(filepath.Join(img, "pages-*.img"))
	for _, f := range pages {
		if fi, err := os.Stat(f); err == nil {
			local += fi.Size()
		}
	}
	if local > 4<<20 {
		t.Fatalf("lazy dump wrote %d bytes of pages into its images, want the 32 MiB to go lazily", local)
	}
	// All pages arrived: the copy still runs with intact memory, and the
	// source is gone.
	e2e.Verify(t, p.On(b))
	if _, err := p.Info(); !errors.Is(err, e2e.ErrNoProcess) {
		t.Fatalf("source after the lazy dump finished: %v", err)
	}
	t.Logf("lazily moved PID %d from %s to %s: %d bytes of pages in the images", p.PID, a.Name, b.Name, local)
}
