package criurpc

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

const sampleLog = `(00.000000) Version: 4.2.1 (gitid 0)
(00.000031) Running on host Linux 6.18.44 #1 SMP x86_64
(00.000100) Error (criu/crtools.c:92): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.012345) Seized task 4242, state 1
(00.020000) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option.
(00.020100) Error (criu/cr-dump.c:1545): Dump files (pid: 4242) failed with -1
(00.021000)   4242: Warn  (criu/x.c:3): something odd
(00.030000) Error (criu/cr-dump.c:1975): Dumping FAILED.
`

func TestSummarizeLog(t *testing.T) {
	s := summarizeLog([]byte(sampleLog))
	if s.firstErr != "inet: Connected TCP socket, consider using --tcp-established option." {
		t.Fatalf("firstErr %q", s.firstErr)
	}
	want := []string{
		"Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option.",
		"Error (criu/cr-dump.c:1545): Dump files (pid: 4242) failed with -1",
		"Warn  (criu/x.c:3): something odd",
		"Error (criu/cr-dump.c:1975): Dumping FAILED.",
	}
	if strings.Join(s.tail, "\n") != strings.Join(want, "\n") {
		t.Fatalf("tail:\n%s\nwant:\n%s", strings.Join(s.tail, "\n"), strings.Join(want, "\n"))
	}
	for _, l := range s.tail {
		if strings.Contains(l, "RLIMIT_NOFILE") {
			t.Fatalf("tail keeps the harmless rlimit line: %q", l)
		}
	}

	// Without error lines the tail is the end of the log.
	var b strings.Builder
	for i := 0; i < 30; i++ {
		b.WriteString("(00.1) line\n")
	}
	b.WriteString("(00.2) last\n")
	s = summarizeLog([]byte(b.String()))
	if s.firstErr != "" || len(s.tail) != logTailLines || s.tail[len(s.tail)-1] != "last" {
		t.Fatalf("summary %+v", s)
	}
}

func TestReadLogSummaryMissing(t *testing.T) {
	if s := readLogSummary(filepath.Join(t.TempDir(), "nope.log")); s.firstErr != "" || s.tail != nil {
		t.Fatalf("summary of a missing log: %+v", s)
	}
}

func TestErrorFormatAndUnwrap(t *testing.T) {
	e := &Error{Op: "dump", PID: 4242, Errno: unix.EBUSY, Msg: "inet: Connected TCP socket, consider using --tcp-established option."}
	want := "dump of pid 4242 failed: inet: Connected TCP socket, consider using --tcp-established option. [errno 16: device or resource busy]"
	if e.Error() != want {
		t.Fatalf("Error() = %q\nwant %q", e.Error(), want)
	}
	if !errors.Is(e, unix.EBUSY) {
		t.Fatal("does not unwrap to its errno")
	}
	var errno unix.Errno
	if !errors.As(e, &errno) || errno != unix.EBUSY {
		t.Fatalf("errors.As errno = %v", errno)
	}
	e = &Error{Op: "pre-dump", PID: 7, Err: ErrNoMemTracking}
	if !errors.Is(e, ErrNoMemTracking) || !strings.Contains(e.Error(), "soft-dirty") {
		t.Fatalf("%v", e)
	}
	e = &Error{Op: "restore", Msg: "no such file", Err: ErrCRIUExited}
	if e.Error() != "restore failed: no such file (criu exited before answering)" {
		t.Fatalf("Error() = %q", e.Error())
	}
}

func TestVersion(t *testing.T) {
	for _, tc := range []struct {
		v      Version
		str    string
		header int
	}{
		{Version{Major: 4, Minor: 2, Sublevel: 1}, "4.2.1", 32},
		{Version{Major: 4, Minor: 2}, "4.2", 32},
		{Version{Major: 4, Minor: 1, Sublevel: 1}, "4.1.1", 24},
		{Version{Major: 3, Minor: 17, Sublevel: 1}, "3.17.1", 24},
		{Version{Major: 5, Minor: 0, GitID: "abc"}, "5.0-abc", 32},
		{Version{Major: 4, Minor: 3, Sublevel: 0, Extra: 2}, "4.3.0.2", 32},
	} {
		if s := tc.v.String(); s != tc.str {
			t.Errorf("%+v String() = %q, want %q", tc.v, s, tc.str)
		}
		if h := tc.v.PageServerHeaderSize(); h != tc.header {
			t.Errorf("%s header %d, want %d", tc.str, h, tc.header)
		}
	}
	v := Version{Major: 4, Minor: 2}
	if !v.AtLeast(4, 2) || !v.AtLeast(3, 99) || v.AtLeast(4, 3) || v.AtLeast(5, 0) {
		t.Fatal("AtLeast wrong")
	}
}

func TestCapabilitiesCompatible(t *testing.T) {
	caps := func(maj, min int) Capabilities {
		v := Version{Major: maj, Minor: min}
		return Capabilities{Version: v, PageServerHeaderSize: v.PageServerHeaderSize()}
	}
	if err := caps(4, 2).Compatible(caps(4, 2)); err != nil {
		t.Fatal(err)
	}
	if err := caps(4, 2).Compatible(caps(4, 3)); err != nil {
		t.Fatal(err)
	}
	if err := caps(4, 1).Compatible(caps(4, 2)); err == nil || !strings.Contains(err.Error(), "header size") {
		t.Fatalf("4.1 -> 4.2: %v", err)
	}
	if err := caps(4, 3).Compatible(caps(4, 2)); err == nil || !strings.Contains(err.Error(), "older") {
		t.Fatalf("4.3 -> 4.2: %v", err)
	}
}

func TestDumpRequest(t *testing.T) {
	dir := t.TempDir()
	conn, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var files reqFiles
	defer files.close()
	opts, err := dumpRequest(DumpOptions{
		ImagesDir: dir, PID: 42, LeaveStopped: true, TCPEstablished: true, ShellJob: true,
		NetworkLock: NetworkLockNFTables, ManageCgroups: CgroupSoft, ParentImage: "../1",
		PageServer: &PageServerTarget{Conn: conn}, TrackMem: true,
		Raw: func(o *rpcpb.CriuOpts) { o.AutoDedup = proto.Bool(true) },
	}, "dump.log", &files)
	if err != nil {
		t.Fatal(err)
	}
	if opts.GetPid() != 42 || !opts.GetLeaveStopped() || opts.LeaveRunning != nil || !opts.GetTcpEstablished() ||
		!opts.GetShellJob() || opts.GetNetworkLock() != rpcpb.CriuNetworkLockMethod_NFTABLES ||
		opts.GetManageCgroupsMode() != rpcpb.CriuCgMode_SOFT || opts.GetParentImg() != "../1" ||
		!opts.GetTrackMem() || !opts.GetAutoDedup() || opts.GetLogFile() != "dump.log" {
		t.Fatalf("opts %v", opts)
	}
	// The page-stream socket is CRIU's fd 4 (the swrk socket is 3).
	if opts.GetPs().GetFd() != 4 || len(files.inherit) != 1 || files.inherit[0] != conn {
		t.Fatalf("ps %v, inherit %v", opts.GetPs(), files.inherit)
	}
	if opts.GetImagesDirFd() != int32(files.dirs[0].Fd()) || opts.WorkDirFd != nil {
		t.Fatalf("dirs: images fd %d, work fd %v", opts.GetImagesDirFd(), opts.WorkDirFd)
	}
	if files.logPath != filepath.Join(dir, "dump.log") {
		t.Fatalf("log path %s", files.logPath)
	}

	for _, tc := range []struct {
		name string
		o    DumpOptions
	}{
		{"no pid", DumpOptions{ImagesDir: dir}},
		{"no dir", DumpOptions{PID: 1}},
		{"running and stopped", DumpOptions{ImagesDir: dir, PID: 1, LeaveRunning: true, LeaveStopped: true}},
		{"log with slash", DumpOptions{ImagesDir: dir, PID: 1, LogFile: "a/b.log"}},
		{"page server without target", DumpOptions{ImagesDir: dir, PID: 1, PageServer: &PageServerTarget{}}},
		{"lazy without port", DumpOptions{ImagesDir: dir, PID: 1, LazyPages: true}},
	} {
		var f reqFiles
		_, err := dumpRequest(tc.o, "dump.log", &f)
		f.close()
		if !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%s: error %v, want ErrInvalidOptions", tc.name, err)
		}
	}
}

func TestRestoreRequest(t *testing.T) {
	dir, work := t.TempDir(), t.TempDir()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var files reqFiles
	defer files.close()
	opts, err := restoreRequest(RestoreOptions{
		ImagesDir: dir, WorkDir: work, LogFile: "r.log", LogLevel: LogDebug, Sibling: true, LeaveStopped: true,
		InheritFDs: []InheritFD{{Key: "pipe:[1]", File: f}}, TCPEstablished: true, NetworkLock: NetworkLockNFTables,
	}, &files)
	if err != nil {
		t.Fatal(err)
	}
	if opts.GetNetworkLock() != rpcpb.CriuNetworkLockMethod_NFTABLES || !opts.GetTcpEstablished() {
		t.Fatalf("network lock %v, tcp_established %v", opts.GetNetworkLock(), opts.GetTcpEstablished())
	}
	if !opts.GetRstSibling() || !opts.GetLeaveStopped() || opts.GetLogLevel() != 4 ||
		len(opts.GetInheritFd()) != 1 || opts.GetInheritFd()[0].GetFd() != 4 || opts.GetInheritFd()[0].GetKey() != "pipe:[1]" {
		t.Fatalf("opts %v", opts)
	}
	if opts.WorkDirFd == nil || files.workDir != work || files.logPath != filepath.Join(work, "r.log") {
		t.Fatalf("work dir: fd %v, %s, %s", opts.WorkDirFd, files.workDir, files.logPath)
	}
}

func TestHooksDispatch(t *testing.T) {
	var got []string
	rec := func(s string) func(context.Context) error {
		return func(context.Context) error { got = append(got, s); return nil }
	}
	h := &Hooks{
		PreDump: rec("pre-dump"), PostDump: rec("post-dump"), PreRestore: rec("pre-restore"),
		PostRestore:   func(_ context.Context, pid int) error { got = append(got, "post-restore"); return nil },
		NetworkLock:   rec("network-lock"),
		NetworkUnlock: rec("network-unlock"),
		SetupNamespaces: func(_ context.Context, pid int) error {
			got = append(got, "setup-namespaces")
			return nil
		},
		PostSetupNamespaces: rec("post-setup-namespaces"), PreResume: rec("pre-resume"),
		PostResume: rec("post-resume"), StatusReady: rec("status-ready"),
	}
	stages := []Stage{StagePreDump, StagePostDump, StagePreRestore, StagePostRestore, StageNetworkLock,
		StageNetworkUnlock, StageSetupNamespaces, StagePostSetupNamespaces, StagePreResume, StagePostResume,
		StageStatusReady, StagePreStream, StageQueryExtFiles, Stage("from-the-future")}
	for _, s := range stages {
		if err := h.Notify(context.Background(), Notification{Stage: s}); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != 11 {
		t.Fatalf("handled %v", got)
	}
	for i, s := range got {
		if s != string(stages[i]) {
			t.Fatalf("stage %d handled as %s", i, s)
		}
	}
	// Without a handler the orphan pty master is closed.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := (&Hooks{}).Notify(context.Background(), Notification{Stage: StageOrphanPtsMaster, File: w}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatal("orphan pty master left open")
	}
}

// statsImage builds a stats image around a StatsEntry.
func statsImage(t testing.TB, e *rpcpb.StatsEntry) []byte {
	t.Helper()
	pb, err := proto.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	b := binary.NativeEndian.AppendUint32(nil, imgServiceMagic)
	b = binary.NativeEndian.AppendUint32(b, statsMagic)
	b = binary.NativeEndian.AppendUint32(b, uint32(len(pb)))
	return append(b, pb...)
}

func sampleDumpStats() *rpcpb.StatsEntry {
	return &rpcpb.StatsEntry{Dump: &rpcpb.DumpStatsEntry{
		FreezingTime: proto.Uint32(167), FrozenTime: proto.Uint32(25203), MemdumpTime: proto.Uint32(2869),
		MemwriteTime: proto.Uint32(230), PagesScanned: proto.Uint64(57), PagesSkippedParent: proto.Uint64(3),
		PagesWritten: proto.Uint64(30), PagesLazy: proto.Uint64(0), PagePipes: proto.Uint64(6),
	}}
}

func sampleRestoreStats() *rpcpb.StatsEntry {
	return &rpcpb.StatsEntry{Restore: &rpcpb.RestoreStatsEntry{
		PagesCompared: proto.Uint64(1), PagesSkippedCow: proto.Uint64(2), ForkingTime: proto.Uint32(10),
		RestoreTime: proto.Uint32(5445), PagesRestored: proto.Uint64(30),
	}}
}

func TestParseStats(t *testing.T) {
	d, err := ParseDumpStats(statsImage(t, sampleDumpStats()))
	if err != nil {
		t.Fatal(err)
	}
	if d.FrozenTime != 25203*time.Microsecond || d.PagesScanned != 57 || d.PagesWritten != 30 ||
		d.PagesSkippedParent != 3 || d.MemDumpTime != 2869*time.Microsecond || d.PagePipes != 6 {
		t.Fatalf("dump stats %+v", d)
	}
	r, err := ParseRestoreStats(statsImage(t, sampleRestoreStats()))
	if err != nil {
		t.Fatal(err)
	}
	if r.RestoreTime != 5445*time.Microsecond || r.PagesRestored != 30 || r.PagesSkippedCOW != 2 {
		t.Fatalf("restore stats %+v", r)
	}
	if _, err := ParseRestoreStats(statsImage(t, sampleDumpStats())); !errors.Is(err, ErrBadStatsImage) {
		t.Fatalf("restore stats from a dump image: %v", err)
	}

	good := statsImage(t, sampleDumpStats())
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short", good[:10]},
		{"head magic", append([]byte{1, 2, 3, 4}, good[4:]...)},
		{"stats magic", append(append(append([]byte{}, good[:4]...), 1, 2, 3, 4), good[8:]...)},
		{"truncated", good[:len(good)-1]},
		{"trailing", append(append([]byte{}, good...), 0)},
		{"garbage entry", append(append([]byte{}, good[:8]...), 2, 0, 0, 0, 0xff, 0xff)},
	} {
		if _, err := ParseDumpStats(tc.b); !errors.Is(err, ErrBadStatsImage) {
			t.Errorf("%s: error %v, want ErrBadStatsImage", tc.name, err)
		}
	}

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "stats-dump"), good, 0o644); err != nil {
		t.Fatal(err)
	}
	if d, err := ReadDumpStats(dir); err != nil || d.PagesWritten != 30 {
		t.Fatalf("ReadDumpStats: %+v, %v", d, err)
	}
	if _, err := ReadRestoreStats(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadRestoreStats without a file: %v", err)
	}
}

func TestTreePIDsMissing(t *testing.T) {
	if _, err := TreePIDs(-5); !errors.Is(err, ErrNoProcess) {
		t.Fatalf("error %v", err)
	}
}

// TestInventoryRunID reads the run id from an inventory image recorded
// from a real CRIU 4.2.1 dump, and refuses damaged ones.
func TestInventoryRunID(t *testing.T) {
	b, err := os.ReadFile("testdata/inventory-tcp.img")
	if err != nil {
		t.Fatal(err)
	}
	id, err := parseInventoryRunID(b)
	if err != nil || id != "19b27125-5a72-48fa-84d5-2033fb6f05a2" {
		t.Fatalf("run id %q, %v", id, err)
	}
	if got := NetworkLockTable(id); got != "CRIU-19b27125-5a72-48fa-84" {
		t.Fatalf("table %q", got)
	}
	for name, bad := range map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte{0, 0, 0, 0}, b[4:]...),
		"truncated": b[:len(b)-5],
		"no run id": append(append([]byte(nil), b[:4]...), 0, 0, 0, 0),
	} {
		if _, err := parseInventoryRunID(bad); !errors.Is(err, ErrBadInventory) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
