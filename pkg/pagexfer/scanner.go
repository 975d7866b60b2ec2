package pagexfer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// ScannerOptions configure a Scanner.
type ScannerOptions struct {
	// ReadSize is the most memory read from a process in one
	// process_vm_readv call (default 4 MiB, at least one page).
	ReadSize int
	// Logger receives debug logs; a null logger if nil.
	Logger hclog.Logger
}

// RoundStats describe one pre-copy round.
type RoundStats struct {
	Round        int           // 1 for the first round
	PagesScanned uint64        // resident pages read
	PagesChanged uint64        // of which the content differs from the last round (all, in round 1)
	PagesSent    uint64        // pages whose content went on the wire
	BytesRaw     uint64        // uncompressed batch bytes of the round
	BytesWire    uint64        // batch bytes on the wire
	Duration     time.Duration // time the round took
	// DirtyRate is the memory that changed per second: PagesChanged×4096
	// over the time since the previous round started (over Duration in
	// round 1).
	DirtyRate float64
	// Gone lists the processes that exited; they are not scanned again.
	Gone []int
}

// Scanner copies the memory of running processes to the destination in
// rounds, without stopping them and without soft-dirty tracking: each
// round reads every resident private page, hashes it, and sends the pages
// whose content changed since the last round and is not already held by
// the destination.
//
// Which memory: mappings CRIU dumps as pages, that is private mappings
// (anonymous, or file-backed pages that were written to and so are no
// longer the file's) and shared anonymous memory, except [vdso], [vvar]
// and [vsyscall]. Only resident pages are read (/proc/PID/pagemap bit 63);
// swapped-out pages are left to the final dump rather than faulting them
// back in. Reads go through process_vm_readv, which takes no lock the
// process could notice beyond mmap_lock for reading.
type Scanner struct {
	pids      []int
	opts      ScannerOptions
	log       hclog.Logger
	last      map[int]map[uint64]Hash
	round     int
	lastStart time.Time
	buf       []byte
	pm        []byte
}

// NewScanner returns a Scanner for the processes pids (thread group ids:
// threads share their process's memory).
func NewScanner(pids []int, opts ScannerOptions) *Scanner {
	if opts.ReadSize <= 0 {
		opts.ReadSize = 4 << 20
	}
	opts.ReadSize = max(opts.ReadSize/PageSize, 1) * PageSize
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	return &Scanner{
		pids: append([]int(nil), pids...),
		opts: opts,
		log:  opts.Logger,
		last: make(map[int]map[uint64]Hash),
		buf:  make([]byte, opts.ReadSize),
		pm:   make([]byte, opts.ReadSize/PageSize*8),
	}
}

// Round scans every process once and sends changed pages through s; it
// returns when s has handed every batch of the round to its sink.
func (sc *Scanner) Round(ctx context.Context, s *Sender) (RoundStats, error) {
	sc.round++
	st := RoundStats{Round: sc.round}
	start := time.Now()
	before := s.Counters()
	alive := sc.pids[:0]
	for _, pid := range sc.pids {
		err := sc.scan(ctx, pid, s, &st)
		if errors.Is(err, errGone) {
			sc.log.Debug("process gone", "pid", pid)
			st.Gone = append(st.Gone, pid)
			delete(sc.last, pid)
			continue
		}
		if err != nil {
			return st, fmt.Errorf("pre-copy round %d: pid %d: %w", sc.round, pid, err)
		}
		alive = append(alive, pid)
	}
	sc.pids = alive
	if err := s.Flush(ctx, false); err != nil {
		return st, fmt.Errorf("pre-copy round %d: %w", sc.round, err)
	}
	d := s.Counters().Sub(before)
	st.PagesSent = d.PagesSent
	st.BytesRaw, st.BytesWire = d.RawBytes, d.WireBytes
	st.Duration = time.Since(start)
	interval := st.Duration
	if !sc.lastStart.IsZero() {
		interval = start.Sub(sc.lastStart)
	}
	sc.lastStart = start
	if interval > 0 {
		st.DirtyRate = float64(st.PagesChanged*PageSize) / interval.Seconds()
	}
	return st, nil
}

var errGone = errors.New("process gone")

// vma is one mapping worth scanning.
type vma struct {
	start, end uint64
	filePriv   bool // private file mapping: skip pages still the file's
}

// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = uint64(1) << 63
	pmFile    = uint64(1) << 61
)

func readMaps(pid int) ([]vma, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errGone
		}
		return nil, err
	}
	defer f.Close()
	var vs []vma
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := parseMapsLine(sc.Text()); ok {
			vs = append(vs, v)
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, errGone
		}
		return nil, fmt.Errorf("read maps: %w", err)
	}
	return vs, nil
}

// parseMapsLine reads one /proc/PID/maps line and says whether CRIU would
// dump the mapping's pages.
func parseMapsLine(line string) (vma, bool) {
	fields := strings.Fields(line)
	if len(fields) < 5 {
		return vma{}, false
	}
	lo, hi, ok := strings.Cut(fields[0], "-")
	if !ok {
		return vma{}, false
	}
	start, err1 := strconv.ParseUint(lo, 16, 64)
	end, err2 := strconv.ParseUint(hi, 16, 64)
	perms := fields[1]
	if err1 != nil || err2 != nil || end <= start || len(perms) < 4 || perms[0] != 'r' {
		return vma{}, false
	}
	path := ""
	if len(fields) > 5 {
		path = strings.Join(fields[5:], " ")
	}
	switch path {
	case "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]":
		return vma{}, false
	}
	v := vma{start: start, end: end}
	switch perms[3] {
	case 'p':
		v.filePriv = fields[4] != "0"
		return v, true
	case 's':
		// Shared anonymous memory, dumped by CRIU as shmem pages.
		if path == "/dev/zero (deleted)" || strings.HasPrefix(path, "/SYSV") {
			return v, true
		}
	}
	return vma{}, false
}

func (sc *Scanner) scan(ctx context.Context, pid int, s *Sender, st *RoundStats) error {
	vmas, err := readMaps(pid)
	if err != nil {
		return err
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errGone
		}
		return err
	}
	defer pm.Close()
	prev := sc.last[pid]
	cur := make(map[uint64]Hash, len(prev))
	window := uint64(len(sc.buf) / PageSize)
	for _, v := range vmas {
		for a := v.start; a < v.end; a += window * PageSize {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(window, (v.end-a)/PageSize)
			if err := sc.window(ctx, pid, pm, v, a, n, s, st, prev, cur); err != nil {
				return err
			}
		}
	}
	sc.last[pid] = cur
	return nil
}

// window scans n pages from address a of mapping v.
func (sc *Scanner) window(ctx context.Context, pid int, pm *os.File, v vma, a, n uint64,
	s *Sender, st *RoundStats, prev, cur map[uint64]Hash) error {
	ents := sc.pm[:n*8]
	got, err := pm.ReadAt(ents, int64(a/PageSize*8))
	if err != nil && got < len(ents) {
		if errors.Is(err, unix.ESRCH) {
			return errGone
		}
		// The mapping went away under us (EOF/EINVAL): nothing to read.
		sc.log.Trace("pagemap read failed", "pid", pid, "vaddr", a, "error", err)
		return nil
	}
	// Runs of pages to read, as remote iovecs, packed into buf in order.
	var remote []unix.RemoteIovec
	var addrs []uint64
	for i := uint64(0); i < n; i++ {
		e := le.Uint64(ents[i*8:])
		if e&pmPresent == 0 || (v.filePriv && e&pmFile != 0) {
			continue
		}
		addr := a + i*PageSize
		addrs = append(addrs, addr)
		if k := len(remote); k > 0 && uint64(remote[k-1].Base)+uint64(remote[k-1].Len) == addr {
			remote[k-1].Len += PageSize
		} else {
			remote = append(remote, unix.RemoteIovec{Base: uintptr(addr), Len: PageSize})
		}
	}
	for len(remote) > 0 {
		batch := remote[:min(len(remote), 1024)] // IOV_MAX
		total := 0
		for _, r := range batch {
			total += r.Len
		}
		local := []unix.Iovec{{Base: &sc.buf[0]}}
		local[0].SetLen(total)
		got, err := unix.ProcessVMReadv(pid, local, batch, 0)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				return errGone
			}
			got = 0
		}
		// Pages read in full are used; a run the kernel could not read
		// (unmapped meanwhile) is skipped.
		done := got / PageSize
		if err := sc.pages(ctx, pid, s, st, sc.buf[:done*PageSize], addrs[:done], prev, cur); err != nil {
			return err
		}
		addrs = addrs[done:]
		consumed := 0
		for consumed < len(batch) && got >= batch[consumed].Len {
			got -= batch[consumed].Len
			consumed++
		}
		if consumed < len(batch) {
			// Skip the rest of the run that failed.
			skip := (batch[consumed].Len - got) / PageSize
			sc.log.Trace("process_vm_readv short read", "pid", pid, "vaddr", batch[consumed].Base+uintptr(got), "error", err)
			addrs = addrs[skip:]
			consumed++
		}
		remote = remote[consumed:]
	}
	return nil
}

func (sc *Scanner) pages(ctx context.Context, pid int, s *Sender, st *RoundStats, buf []byte, addrs []uint64, prev, cur map[uint64]Hash) error {
	for i, addr := range addrs {
		p := buf[i*PageSize : (i+1)*PageSize]
		h := zeroHash
		if !isZero(p) {
			h = HashPage(p)
		}
		st.PagesScanned++
		cur[addr] = h
		if old, ok := prev[addr]; ok && old == h {
			continue
		}
		st.PagesChanged++
		if _, err := s.SendPage(ctx, h, p); err != nil {
			return err
		}
	}
	return nil
}
