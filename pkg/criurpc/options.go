package criurpc

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// LogLevel is CRIU's log verbosity (-v): 0 nothing, 1 errors, 2 warnings
// (CRIU's default), 3 information, 4 debug.
type LogLevel int

// Log levels.
const (
	LogDefault LogLevel = 0 // CRIU's default, warnings
	LogErrors  LogLevel = 1
	LogWarn    LogLevel = 2
	LogInfo    LogLevel = 3
	LogDebug   LogLevel = 4
)

// NetworkLock is how CRIU cuts a dumped tree off the network while it is
// frozen (--network-lock).
type NetworkLock int

// Network lock methods.
const (
	// NetworkLockDefault leaves the choice to CRIU (iptables).
	NetworkLockDefault NetworkLock = iota
	// NetworkLockIPTables uses iptables rules (needs the iptables binary).
	NetworkLockIPTables
	// NetworkLockNFTables uses an nftables table "inet CRIU-<run id>"
	// (needs nftables support in CRIU and the kernel; see UnlockNetwork).
	NetworkLockNFTables
	// NetworkLockSkip does not lock: packets reaching a frozen socket may
	// reset connections. Only for trees without TCP connections, or when
	// the caller locks the network itself.
	NetworkLockSkip
)

// CgroupMode is CRIU's --manage-cgroups mode.
type CgroupMode int

// Cgroup modes; CgroupDefault leaves CRIU's default (soft).
const (
	CgroupDefault CgroupMode = iota
	// CgroupIgnore: do not dump or restore cgroups at all.
	CgroupIgnore
	// CgroupNone: restore into the cgroups CRIU runs in.
	CgroupNone
	// CgroupProps: restore properties of cgroups that already exist.
	CgroupProps
	// CgroupSoft: create missing cgroups, restore properties of new ones.
	CgroupSoft
	// CgroupFull: create missing cgroups, restore all properties.
	CgroupFull
	// CgroupStrict: like full, fail when a cgroup exists with other
	// properties.
	CgroupStrict
)

// PageServerTarget tells a dump where to send memory pages instead of
// writing pages-*.img files.
type PageServerTarget struct {
	// Conn, when set, is a connected stream socket (for example one end
	// of a socketpair) that CRIU writes the page-server protocol to. It is
	// passed to CRIU as an inherited fd; the caller keeps its own copy and
	// closes it when it likes.
	Conn *os.File
	// Address and Port of a listening `criu page-server`, used when Conn
	// is nil.
	Address string
	Port    int
}

// DumpOptions are the options of a dump or pre-dump.
type DumpOptions struct {
	// ImagesDir receives the images. Required. The client opens it and
	// passes the fd; CRIU resolves it through /proc/<client pid>/fd, so it
	// must be reachable in the client's mount namespace.
	ImagesDir string
	// WorkDir holds the log and stats-dump files; ImagesDir when empty.
	WorkDir string
	// LogFile is the log's name inside WorkDir (no slashes); "dump.log"
	// or "pre-dump.log" when empty.
	LogFile  string
	LogLevel LogLevel
	// PID is the root of the tree to dump. Required (CRIU would dump the
	// client itself otherwise).
	PID int
	// ParentImage is the directory of the previous pre-dump, relative to
	// ImagesDir (usually "../<previous>"): pages unchanged since then are
	// not dumped again.
	ParentImage string
	// TrackMem asks CRIU to reset soft-dirty bits so that a later dump can
	// use this one as its parent. Needs Features.MemTrack; the client
	// checks first and fails with ErrNoMemTracking instead of letting CRIU
	// abort. Pre-dumps always set it.
	TrackMem bool
	// PageServer sends pages to a page server instead of ImagesDir.
	PageServer *PageServerTarget
	// LeaveRunning resumes the tree after the dump (a snapshot).
	LeaveRunning bool
	// LeaveStopped leaves the tree frozen (SIGSTOPped) after the dump, so
	// that the caller can kill it once the restore elsewhere succeeded or
	// resume it (ResumeTree) when it failed. CRIU detaches the tasks with
	// SIGSTOP pending, so a task may show state R for a moment after the
	// dump returns, but none runs its own code. Without LeaveRunning or
	// LeaveStopped CRIU kills the tree after a successful dump.
	LeaveStopped bool
	// TCPEstablished dumps established TCP connections (otherwise CRIU
	// refuses to dump a tree that has one).
	TCPEstablished bool
	// NetworkLock is how the network is locked while the tree is frozen.
	NetworkLock NetworkLock
	// ShellJob allows a tree that is not its session's leader or has a
	// controlling terminal; the restore must then set ShellJob as well.
	ShellJob bool
	// ExtUnixSk allows unix sockets connected to peers outside the tree.
	ExtUnixSk bool
	// FileLocks dumps file locks.
	FileLocks bool
	// ManageCgroups is the cgroup mode.
	ManageCgroups CgroupMode
	// LazyPages leaves memory pages out of the images: after the dump
	// CRIU serves them on PageServer.Port (all addresses; Address and
	// Conn are ignored) to `criu lazy-pages` on the destination, and the
	// dump returns only when all pages were fetched. StageStatusReady is
	// notified when the server listens.
	LazyPages bool
	// External lists external resources (--external), e.g. "mnt[/data]:data".
	External []string
	// Raw, when set, is called last on the request options, for CRIU
	// options this struct does not name.
	Raw func(*rpcpb.CriuOpts)
}

// RestoreOptions are the options of a restore.
type RestoreOptions struct {
	// ImagesDir holds the images. Required; passed as an fd like
	// DumpOptions.ImagesDir.
	ImagesDir string
	// WorkDir holds the log and stats-restore; ImagesDir when empty.
	WorkDir string
	// LogFile is the log's name inside WorkDir; "restore.log" when empty.
	LogFile  string
	LogLevel LogLevel
	// LeaveStopped leaves the restored tree stopped; resume it with
	// ResumeTree or kill it with KillTree.
	LeaveStopped bool
	// TCPEstablished restores established TCP connections.
	TCPEstablished bool
	// NetworkLock is how the restored connections stay locked until the
	// tree runs; it should match the dump's.
	NetworkLock NetworkLock
	// ShellJob must match the dump's ShellJob.
	ShellJob bool
	// ExtUnixSk allows unix sockets connected to peers outside the tree.
	ExtUnixSk bool
	// FileLocks restores file locks.
	FileLocks bool
	// ManageCgroups is the cgroup mode.
	ManageCgroups CgroupMode
	// Sibling restores the root task as a child of the calling process
	// instead of CRIU's, so the caller must reap it. By default the root
	// task is CRIU's child, and when CRIU exits it is re-parented to the
	// nearest child subreaper or the PID namespace's init.
	Sibling bool
	// LazyPages restores without memory; a `criu lazy-pages` daemon
	// running on WorkDir fills it in on demand (userfaultfd).
	LazyPages bool
	// OrphanPtsMaster hands the master of a pty no restored task holds to
	// the Notifier (StageOrphanPtsMaster).
	OrphanPtsMaster bool
	// InheritFDs replace files of the dumped tree with files of the
	// caller (--inherit-fd).
	InheritFDs []InheritFD
	// External lists external resources (--external).
	External []string
	// Raw, when set, is called last on the request options.
	Raw func(*rpcpb.CriuOpts)
}

// InheritFD replaces the dumped tree's file named Key (as in CRIU's
// --inherit-fd, e.g. "pipe:[12345]") by File.
type InheritFD struct {
	Key  string
	File *os.File
}

// PageServerOptions are the options of a page server.
type PageServerOptions struct {
	// ImagesDir receives the pages. Required.
	ImagesDir string
	// WorkDir holds the log; ImagesDir when empty.
	WorkDir string
	// LogFile is the log's name inside WorkDir; "page-server.log" when
	// empty.
	LogFile  string
	LogLevel LogLevel
	// Conn, when set, is a connected stream socket the page server reads
	// the page-server protocol from instead of listening. The caller keeps
	// its own copy. This is how a local process (not CRIU) feeds the page
	// server a stream.
	Conn *os.File
	// Address and Port to listen on when Conn is nil; all addresses and a
	// free port when empty.
	Address string
	Port    int
	// ParentImage is the previous images directory, relative to
	// ImagesDir, for a dump whose pages are partly in its parent.
	ParentImage string
	// Raw, when set, is called last on the request options.
	Raw func(*rpcpb.CriuOpts)
}

// CPUInfoOptions are the options of CPUInfoDump and CPUInfoCheck.
type CPUInfoOptions struct {
	// ImagesDir receives (dump) or holds (check) cpuinfo.img. Required.
	ImagesDir string
	// WorkDir holds the log; ImagesDir when empty.
	WorkDir string
	// LogFile is the log's name inside WorkDir; "cpuinfo-dump.log" or
	// "cpuinfo-check.log" when empty.
	LogFile  string
	LogLevel LogLevel
}

// reqFiles collects the open dirs and files one request needs. Dirs are
// passed by fd number in the client (CRIU opens /proc/<client>/fd/N);
// inherited files are passed to CRIU's process with ExtraFiles.
type reqFiles struct {
	dirs    []*os.File
	inherit []*os.File
	// logPath is the CRIU log this request writes, for error reports.
	logPath string
	// workDir is where CRIU writes stats.
	workDir string
}

func (r *reqFiles) close() {
	closeAll(r.dirs)
	r.dirs = nil
}

// passFile adds f to the files CRIU inherits and returns its fd number in
// CRIU's process.
func (r *reqFiles) passFile(f *os.File) int32 {
	for i, g := range r.inherit {
		if g == f {
			return int32(swrkFD + 1 + i)
		}
	}
	r.inherit = append(r.inherit, f)
	return int32(swrkFD + len(r.inherit))
}

// dirs opens the images and work directories and fills the matching
// request fields.
func (r *reqFiles) openDirs(o *rpcpb.CriuOpts, images, work, logFile, defLog string, level LogLevel) error {
	if images == "" {
		return fmt.Errorf("%w: no images directory", ErrInvalidOptions)
	}
	if logFile == "" {
		logFile = defLog
	}
	if strings.Contains(logFile, "/") {
		return fmt.Errorf("%w: log file %q must be a name inside the work directory", ErrInvalidOptions, logFile)
	}
	d, err := os.Open(images)
	if err != nil {
		return fmt.Errorf("open images directory: %w", err)
	}
	r.dirs = append(r.dirs, d)
	o.ImagesDirFd = proto.Int32(int32(d.Fd()))
	r.workDir = images
	if work != "" {
		w, err := os.Open(work)
		if err != nil {
			return fmt.Errorf("open work directory: %w", err)
		}
		r.dirs = append(r.dirs, w)
		o.WorkDirFd = proto.Int32(int32(w.Fd()))
		r.workDir = work
	}
	o.LogFile = proto.String(logFile)
	if level != LogDefault {
		o.LogLevel = proto.Int32(int32(level))
	}
	r.logPath = filepath.Join(r.workDir, logFile)
	return nil
}

func (m NetworkLock) proto() *rpcpb.CriuNetworkLockMethod {
	switch m {
	case NetworkLockIPTables:
		return rpcpb.CriuNetworkLockMethod_IPTABLES.Enum()
	case NetworkLockNFTables:
		return rpcpb.CriuNetworkLockMethod_NFTABLES.Enum()
	case NetworkLockSkip:
		return rpcpb.CriuNetworkLockMethod_SKIP.Enum()
	}
	return nil
}

func (m CgroupMode) proto() *rpcpb.CriuCgMode {
	switch m {
	case CgroupIgnore:
		return rpcpb.CriuCgMode_IGNORE.Enum()
	case CgroupNone:
		return rpcpb.CriuCgMode_CG_NONE.Enum()
	case CgroupProps:
		return rpcpb.CriuCgMode_PROPS.Enum()
	case CgroupSoft:
		return rpcpb.CriuCgMode_SOFT.Enum()
	case CgroupFull:
		return rpcpb.CriuCgMode_FULL.Enum()
	case CgroupStrict:
		return rpcpb.CriuCgMode_STRICT.Enum()
	}
	return nil
}

func optBool(b bool) *bool {
	if !b {
		return nil
	}
	return proto.Bool(true)
}

// dumpRequest builds the options of a dump or pre-dump.
func dumpRequest(o DumpOptions, defLog string, r *reqFiles) (*rpcpb.CriuOpts, error) {
	if o.PID <= 0 {
		return nil, fmt.Errorf("%w: no PID to dump", ErrInvalidOptions)
	}
	if o.LeaveRunning && o.LeaveStopped {
		return nil, fmt.Errorf("%w: LeaveRunning and LeaveStopped exclude each other", ErrInvalidOptions)
	}
	opts := &rpcpb.CriuOpts{
		Pid:            proto.Int32(int32(o.PID)),
		LeaveRunning:   optBool(o.LeaveRunning),
		LeaveStopped:   optBool(o.LeaveStopped),
		TcpEstablished: optBool(o.TCPEstablished),
		ShellJob:       optBool(o.ShellJob),
		ExtUnixSk:      optBool(o.ExtUnixSk),
		FileLocks:      optBool(o.FileLocks),
		LazyPages:      optBool(o.LazyPages),
		NetworkLock:    o.NetworkLock.proto(),
		External:       o.External,
	}
	if o.TrackMem {
		opts.TrackMem = proto.Bool(true)
	}
	if o.ParentImage != "" {
		opts.ParentImg = proto.String(o.ParentImage)
	}
	if m := o.ManageCgroups.proto(); m != nil {
		opts.ManageCgroupsMode = m
	}
	if ps := o.PageServer; ps != nil {
		info := &rpcpb.CriuPageServerInfo{}
		switch {
		case o.LazyPages:
			info.Port = proto.Int32(int32(ps.Port))
		case ps.Conn != nil:
			info.Fd = proto.Int32(r.passFile(ps.Conn))
		default:
			if ps.Address == "" || ps.Port <= 0 {
				return nil, fmt.Errorf("%w: page server needs a Conn or an Address and Port", ErrInvalidOptions)
			}
			info.Address = proto.String(ps.Address)
			info.Port = proto.Int32(int32(ps.Port))
		}
		opts.Ps = info
	} else if o.LazyPages {
		return nil, fmt.Errorf("%w: a lazy dump needs PageServer.Port to serve pages on", ErrInvalidOptions)
	}
	if err := r.openDirs(opts, o.ImagesDir, o.WorkDir, o.LogFile, defLog, o.LogLevel); err != nil {
		return nil, err
	}
	if o.Raw != nil {
		o.Raw(opts)
	}
	return opts, nil
}

// restoreRequest builds the options of a restore.
func restoreRequest(o RestoreOptions, r *reqFiles) (*rpcpb.CriuOpts, error) {
	opts := &rpcpb.CriuOpts{
		LeaveStopped:    optBool(o.LeaveStopped),
		TcpEstablished:  optBool(o.TCPEstablished),
		NetworkLock:     o.NetworkLock.proto(),
		ShellJob:        optBool(o.ShellJob),
		ExtUnixSk:       optBool(o.ExtUnixSk),
		FileLocks:       optBool(o.FileLocks),
		RstSibling:      optBool(o.Sibling),
		LazyPages:       optBool(o.LazyPages),
		OrphanPtsMaster: optBool(o.OrphanPtsMaster),
		External:        o.External,
	}
	if m := o.ManageCgroups.proto(); m != nil {
		opts.ManageCgroupsMode = m
	}
	for _, in := range o.InheritFDs {
		if in.Key == "" || in.File == nil {
			return nil, fmt.Errorf("%w: inherit-fd needs a key and a file", ErrInvalidOptions)
		}
		opts.InheritFd = append(opts.InheritFd, &rpcpb.InheritFd{
			Key: proto.String(in.Key),
			Fd:  proto.Int32(r.passFile(in.File)),
		})
	}
	if err := r.openDirs(opts, o.ImagesDir, o.WorkDir, o.LogFile, "restore.log", o.LogLevel); err != nil {
		return nil, err
	}
	if o.Raw != nil {
		o.Raw(opts)
	}
	return opts, nil
}

// pageServerRequest builds the options of a page server.
func pageServerRequest(o PageServerOptions, r *reqFiles) (*rpcpb.CriuOpts, error) {
	info := &rpcpb.CriuPageServerInfo{}
	if o.Conn != nil {
		info.Fd = proto.Int32(r.passFile(o.Conn))
	} else {
		if o.Address != "" {
			info.Address = proto.String(o.Address)
		}
		info.Port = proto.Int32(int32(o.Port))
	}
	opts := &rpcpb.CriuOpts{Ps: info}
	if o.ParentImage != "" {
		opts.ParentImg = proto.String(o.ParentImage)
	}
	if err := r.openDirs(opts, o.ImagesDir, o.WorkDir, o.LogFile, "page-server.log", o.LogLevel); err != nil {
		return nil, err
	}
	if o.Raw != nil {
		o.Raw(opts)
	}
	return opts, nil
}
