package pagexfer

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const helperPages = 4096 // 16 MiB

// TestHelperProcess is not a test: it is the workload the scanner tests
// read, started as a child of the test binary. It maps helperPages pages,
// fills each with distinct content, prints "ready", then for every line
// "touch N" rewrites the first N pages and answers "ok".
func TestHelperProcess(t *testing.T) {
	if os.Getenv("PAGEXFER_HELPER") != "1" {
		return
	}
	mem, err := unix.Mmap(-1, 0, helperPages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Println("mmap:", err)
		os.Exit(1)
	}
	for i := 0; i < helperPages; i++ {
		for j := 0; j < PageSize; j += 8 {
			le.PutUint64(mem[i*PageSize+j:], uint64(i)<<32|uint64(j)|1)
		}
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	gen := uint64(0)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 2 && f[0] == "touch" {
			n, _ := strconv.Atoi(f[1])
			gen++
			for i := 0; i < n; i++ {
				le.PutUint64(mem[i*PageSize:], gen<<48|uint64(i))
			}
			fmt.Println("ok")
		}
	}
	os.Exit(0)
}

type helper struct {
	cmd *exec.Cmd
	in  *os.File
	out *bufio.Scanner
}

func startHelper(t *testing.T) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "PAGEXFER_HELPER=1")
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdin = inR
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	h := &helper{cmd: cmd, in: inW, out: bufio.NewScanner(stdout)}
	t.Cleanup(func() {
		inW.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	h.expect(t, "ready")
	return h
}

func (h *helper) expect(t *testing.T, want string) {
	t.Helper()
	if !h.out.Scan() {
		t.Fatalf("helper ended before %q: %v", want, h.out.Err())
	}
	if got := h.out.Text(); got != want {
		t.Fatalf("helper said %q, want %q", got, want)
	}
}

func (h *helper) touch(t *testing.T, n int) {
	t.Helper()
	fmt.Fprintf(h.in, "touch %d\n", n)
	h.expect(t, "ok")
}

func TestScannerRounds(t *testing.T) {
	h := startHelper(t)
	ctx := context.Background()
	m := newMigration(t, SenderOptions{Compression: CompressionZstd}, 1<<30)
	sc := NewScanner([]int{h.cmd.Process.Pid}, ScannerOptions{ReadSize: 1 << 20})

	r1, err := sc.Round(ctx, m.sender)
	if err != nil {
		t.Fatal(err)
	}
	// The workload's pages plus the Go runtime's own.
	if r1.PagesScanned < helperPages || r1.PagesChanged != r1.PagesScanned || r1.PagesSent < helperPages {
		t.Fatalf("round 1: %+v", r1)
	}
	if r1.BytesWire == 0 || r1.DirtyRate <= 0 {
		t.Fatalf("round 1 has no bytes or rate: %+v", r1)
	}

	h.touch(t, 10)
	r2, err := sc.Round(ctx, m.sender)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Round != 2 || r2.PagesChanged < 10 || r2.PagesChanged > 10+256 {
		// The runtime's own pages (stacks, heap) may change too, but
		// not the rest of the workload's.
		t.Fatalf("round 2 after touching 10 pages: %+v", r2)
	}
	if r2.PagesSent > r2.PagesChanged {
		t.Fatalf("round 2 sent more than changed: %+v", r2)
	}
	// Every content the destination holds came through the pre-copy.
	if got, want := m.store.Stats().Pages, int64(m.sender.Known().Len()); got != want {
		t.Fatalf("store holds %d contents, sender knows %d", got, want)
	}

	t.Logf("round 1: %+v", r1)
	t.Logf("round 2: %+v", r2)
	// The process exits: the next round reports it gone.
	h.in.Close()
	_ = h.cmd.Wait()
	r3, err := sc.Round(ctx, m.sender)
	if err != nil {
		t.Fatal(err)
	}
	if len(r3.Gone) != 1 || r3.PagesScanned != 0 {
		t.Fatalf("round 3 after exit: %+v", r3)
	}
}

func TestParseMapsLine(t *testing.T) {
	for _, tc := range []struct {
		line     string
		ok       bool
		filePriv bool
	}{
		{"55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]", true, false},
		{"7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 ", true, false},
		{"7f3a1e5d8000-7f3a1e5da000 rw-p 001d7000 fe:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6", true, true},
		{"7f3a1e400000-7f3a1e428000 r--p 00000000 fe:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6", true, true},
		{"7f3a1e428000-7f3a1e5bd000 r-xp 00028000 fe:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6", true, true},
		{"7f3a1c000000-7f3a1c021000 ---p 00000000 00:00 0 ", false, false},
		{"7f3a1c000000-7f3a1c021000 rw-s 00000000 00:01 1234 /dev/zero (deleted)", true, false},
		{"7f3a1c000000-7f3a1c021000 rw-s 00000000 00:01 1234 /SYSV00000000 (deleted)", true, false},
		{"7f3a1c000000-7f3a1c021000 rw-s 00000000 fe:01 99 /var/lib/data.db", false, false},
		{"7ffd4b7f6000-7ffd4b7fa000 r--p 00000000 00:00 0                          [vvar]", false, false},
		{"7ffd4b7fa000-7ffd4b7fc000 r-xp 00000000 00:00 0                          [vdso]", false, false},
		{"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]", false, false},
		{"garbage", false, false},
	} {
		v, ok := parseMapsLine(tc.line)
		if ok != tc.ok || (ok && v.filePriv != tc.filePriv) {
			t.Errorf("%q: ok=%v filePriv=%v, want %v %v", tc.line, ok, v.filePriv, tc.ok, tc.filePriv)
		}
	}
}
