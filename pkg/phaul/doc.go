// Package phaul is migrated's migration engine: the state machine that
// moves a running process tree from a source host to a destination host,
// and the commit protocol that guarantees the process is never lost and
// never runs twice.
//
// The engine knows nothing of gRPC or the wire format. It drives small
// interfaces: Local (the source host: inspect, pre-copy, dump, resume,
// kill), Peer (the destination agent as the source sees it), DestLocal
// (the destination host: checks, page store, restore), and a Journal.
// cmd/migrated wires them to CRIU (pkg/criurpc), the page transfer
// (pkg/pagexfer) and gRPC (internal/agent); the unit tests wire them to
// fakes.
//
// # Phases
//
// A Source runs one goroutine per migration through these phases, each
// with a deadline, emitting Events as it goes:
//
//  1. Prepare: inspect the tree (/proc), probe CRIU, ask the destination
//     (Peer.Prepare) to check CRIU versions and page-server header sizes,
//     the CPU (criu cpuinfo check), that the tree's PIDs are free and that
//     its open files exist. Any problem ends the migration here; nothing
//     was touched.
//  2. Pre-copy (ModePrecopy): rounds of Precopy.Round while the process
//     runs. After each round Policy.Decide estimates the downtime (dirty
//     bytes ÷ measured bandwidth + dump and freeze costs) and stops when it
//     is within the target, when nothing changed, when the dirty set stops
//     shrinking, or at the round limit; every decision is reported with its
//     reason.
//  3. Dump: Local.Dump freezes the tree and dumps it with CRIU; pages go to
//     the destination as a stream in which what it already holds travels
//     as references. On success the tree is left frozen (stopped).
//  4. Transfer: the non-memory images go to the destination.
//  5. Restore: the destination restores the tree left stopped.
//  6. Commit, below.
//
// # Commit protocol
//
// The source is the coordinator; the destination never decides.
//
//   - The destination restores the tree stopped and answers Restore. It
//     never resumes a restored tree on its own and never discards one
//     except on an explicit Abort.
//   - The source writes its decision to its journal (fsync, atomic
//     replace) before acting on it. Commit: the journal says
//     decided-commit; the source sends Commit, re-sending until the
//     destination acknowledges; the destination resumes its copy and
//     answers; then the source kills its frozen copy. The frozen copy
//     cannot run again (after decided-commit the source never resumes it
//     but in the case below), and until the destination's copy is
//     confirmed it is the only one known to exist. Abort: the journal says
//     decided-abort; the source resumes its copy (safe before the
//     destination answers, because the destination never resumes on its
//     own), then sends Abort, re-sending in the background until
//     acknowledged.
//   - A destination that lost its restored copy before the commit reached
//     it (a reboot kills a stopped tree as surely as a running one) has
//     recorded the migration as aborted, and answers Commit with
//     ErrDiscarded. It holds no copy and never will, so the source resumes
//     its frozen copy and records the migration as aborted.
//   - Commit and Abort are idempotent by migration id: a repeated Commit
//     returns the running PID, a repeated Abort does nothing, and an Abort
//     after a Commit is refused (ErrTooLate).
//   - The commit point is the durable decided-commit record. Before it,
//     any failure or a cancel aborts; after it, cancel is refused and the
//     migration is finished forward.
//
// So at every instant at most one copy runs, and after any single fault at
// least one copy exists: before the decision the source's copy (running or
// frozen), after it the destination's (stopped or running), and the
// source's frozen copy until the destination's is confirmed.
//
// # Recovery
//
// On start an agent reads its journal (Source.Recover, Destination.Recover).
// The source drives every unfinished record to an end: decided-commit is
// carried forward (re-send Commit, then kill the source copy if it is
// still there, or resume it if the destination answers ErrDiscarded); any
// other state is aborted (journal decided-abort, resume the
// source copy, re-send Abort). The destination reloads its records: a tree
// restored before the crash is kept, stopped, for the source's decision;
// anything short of a restored tree is discarded, since the source can only
// abort it. Records reach a terminal state (done, aborted, failed) and stay
// in the journal for `migratectl status`.
//
// Recovery signals only the processes the journal names: each record
// carries the tree's Identity (the boot id and every task's start time),
// and a PID that another process took since (after an exit, or after a
// reboot) is neither resumed, nor killed, nor taken for a restored copy.
//
// # Cancellation and shutdown
//
// Source.Cancel stops a migration before its commit point and the
// migration's goroutine restores the status quo. Source.Close cancels
// migrations before their commit point (their processes resume on this
// host), lets those past it finish, and stops background re-sends, which
// the next start's recovery takes up again.
package phaul
