// Package criurpc is a Go client for CRIU's RPC interface ("swrk" mode): it
// dumps, pre-dumps and restores process trees, runs page servers, and asks
// CRIU what it and the kernel can do.
//
// # The swrk protocol
//
// Every operation starts its own CRIU process: the client creates a
// socketpair(AF_UNIX, SOCK_SEQPACKET), passes one end to `criu swrk 3` as fd
// 3 and keeps the other. Each datagram carries one protobuf message: the
// client sends a criu_req (type, options), CRIU answers with criu_resp
// datagrams. Before its final answer CRIU may send notifications
// (criu_resp of type NOTIFY, naming a stage such as "post-dump"), each of
// which the client must answer with a criu_req of type NOTIFY and
// notify_success; CRIU waits for that answer. A notification may carry an fd
// as SCM_RIGHTS ancillary data (the pty master of "orphan-pts-master").
// After its final answer CRIU exits, unless the request set keep_open, which
// CRIU honours for version, feature-check, cpuinfo and page-server requests.
//
// The messages are defined in rpcpb/rpc.proto: our own copy of CRIU's
// images/rpc.proto with CRIU's field names and numbers (CRIU 4.2), compiled
// with google.golang.org/protobuf. We keep it instead of importing go-criu's
// generated package because that package uses a different protobuf runtime
// and its FeatureCheck returns the request instead of CRIU's answer; owning
// the .proto keeps one protobuf runtime in the module and lets it cover the
// 4.2 fields. rpcpb/stats.proto describes the stats images.
//
// # Sessions
//
// Most operations are one request on one CRIU process. Three are sessions
// with a longer life, each with an owner that must end it:
//
//   - PreDump returns a PreDumpSession. After a PRE_DUMP request CRIU accepts
//     only further PRE_DUMP requests or one DUMP on the same swrk socket, so
//     the session offers exactly those (PreDump, Dump) and Close. Files CRIU
//     inherits, such as the page-stream socket, are passed when the session
//     starts and reused by later requests.
//   - StartPageServer sends PAGE_SERVER_CHLD with keep_open: CRIU forks a page
//     server as its own child and stays, so that PageServer.Wait can send
//     WAIT_PID and learn when the page server exited. A page server
//     acknowledges the stream's CLOSE before it has flushed its image files;
//     only its exit (Wait returning) says the images are complete.
//     PageServer.Kill kills it and still lets CRIU reap it.
//   - Probe uses keep_open to ask for the version and the features on one
//     CRIU process.
//
// # Files and descriptors
//
// CRIU treats the fds in a request in two ways. images_dir_fd and
// work_dir_fd are fds in the client: CRIU opens /proc/<client pid>/fd/<n>
// (the client's PID comes from SO_PEERCRED), so the directories must be
// visible in the client's mount namespace and the client must be the process
// that runs swrk. ps.fd and inherit_fd are fd numbers in CRIU's own process:
// the client passes those files with exec's ExtraFiles (fd 4 onwards) and
// puts the child's fd number into the request.
//
// # Page streams
//
// A dump sends pages to a page server instead of pages-*.img when
// DumpOptions.PageServer is set, either to a listening page server
// (Address, Port) or into a connected socket (Conn, sent as ps.fd). With
// Conn, CRIU ends its stream with FORCE_CLOSE instead of CLOSE, because the
// socket stays open in other processes.
//
// A page server (StartPageServer) listens on Address:Port (Port 0 picks a
// free port, reported in PageServer.Port) or, with PageServerOptions.Conn,
// serves a connected socket passed as ps.fd (CRIU's --ps-socket; CRIU
// allows this in swrk mode). The passed-socket form lets a local process,
// not CRIU, write a page-server protocol stream into the page server: a
// socketpair whose other end the caller writes. CRIU's swrk process keeps
// its own copy of the passed socket until the session ends, so the writer
// does not see EOF from the page server's exit.
//
// A lazy dump (DumpOptions.LazyPages) leaves memory out of the images and,
// after the dump, serves it on PageServer.Port to `criu lazy-pages` on the
// destination; the dump returns only when every page was fetched, and
// StageStatusReady announces that the server listens. A restore with
// RestoreOptions.LazyPages needs a `criu lazy-pages` daemon on its work
// directory, connected to that server: CRIU has no RPC request for it, so
// StartLazyPages runs `criu lazy-pages` with command-line options and
// returns once it listens (--status-fd); LazyPages.Wait returns once every
// page reached the restored tree. The destination needs the dump's other
// images before the daemon starts. Lazy pages need userfaultfd
// (Features.LazyPages) and, where root lacks CAP_SYS_RESOURCE,
// fs.pipe-max-size of at least 4 MiB.
//
// # Restored processes and their parent
//
// In swrk mode CRIU always restores detached. By default (Sibling false)
// the restored root task is CRIU's child; when CRIU exits after answering,
// the kernel re-parents the tree to the nearest child subreaper, or else to
// the PID namespace's init, which reaps it when it exits. The calling daemon
// is therefore not the parent (unless it made itself a child subreaper) and
// the restored tree survives the daemon's exit. With Sibling (rst_sibling)
// CRIU creates the root task with CLONE_PARENT, making it the caller's
// child: the caller must then reap it, and the tree is re-parented when the
// caller exits. RestoreResult.PID is in the caller's PID namespace.
//
// # Stopped trees
//
// A dump with LeaveStopped ends with the tree's tasks detached and stopped
// by SIGSTOP. ResumeTree sends SIGCONT to every process of the tree (which
// cannot fork while stopped, so the list from /proc/PID/task/*/children is
// exact); KillTree sends SIGKILL. A restore with LeaveStopped leaves the
// restored tree stopped the same way. A frozen source still accepts TCP
// connections into its listen backlogs, so it should not stay stopped long.
//
// # Memory tracking
//
// Pre-dumps need the kernel's soft-dirty bits. Without them CRIU's pre-dump
// aborts unless track_mem is set, in which case it refuses cleanly. PreDump
// (and Dump with TrackMem) therefore first asks CRIU's feature check on the
// same swrk process and fails with ErrNoMemTracking, without touching the
// tree, when the kernel has no soft-dirty tracking; pre-dump requests always
// set track_mem.
//
// # Options
//
// DumpOptions, RestoreOptions, PageServerOptions and CPUInfoOptions name the
// CRIU options the engine uses; each field documents its meaning. The
// images directory is required; the work directory (for the log and the
// stats images) defaults to it. A Raw function may set any other field of
// the request.
//
// # Notifications
//
// A Notifier passed to Dump, PreDump or Restore sets notify_scripts and
// receives every notification. Hooks is a Notifier with one function per
// stage. Returning an error answers notify_success=false: CRIU then fails the
// operation, and after StagePostDump it resumes the frozen tree instead of
// killing it or leaving it stopped.
//
// # Errors and lifetimes
//
// A failed operation returns *Error: the operation, CRIU's errno (Error
// unwraps to a unix.Errno), the most meaningful message (CRIU's first error
// for the request, or the first "Error (" line of its log) and the last
// meaningful log lines, leaving out the harmless RLIMIT_NOFILE line logged
// where root lacks CAP_SYS_RESOURCE. It reads like
// "dump of pid 4242 failed: inet: Connected TCP socket, consider using
// --tcp-established option.".
//
// CRIU runs in its own process group. When the operation's context ends,
// the client kills that group (CRIU and every helper it forked) and returns
// the context's error; when CRIU dies it returns ErrCRIUExited; when CRIU
// sends something that is not a valid answer it kills CRIU and returns
// ErrProtocol. In every case the CRIU process is reaped before the operation
// returns, or, for sessions, when their owner ends them. Killing CRIU in the
// middle of a dump lets the kernel detach the tree, which runs on; killing it
// in the middle of a restore can leave partly restored tasks that are not in
// CRIU's process group: the caller should kill the restored PIDs it knows
// of.
//
// # Statistics
//
// After a dump or restore CRIU writes stats-dump or stats-restore into the
// work directory: a u32 service magic, the u32 stats magic, a u32 size and a
// protobuf stats_entry, all in host byte order. Dump, PreDumpSession.Stats
// and Restore return them as DumpStats and RestoreStats (nil when the file
// is missing or malformed); ParseDumpStats and ParseRestoreStats decode them
// from bytes.
package criurpc
