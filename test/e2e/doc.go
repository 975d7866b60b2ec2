// Package e2e is migrated's two-host test bed: simulated hosts built from
// Linux namespaces on one machine, and the end-to-end tests that run real
// CRIU, real processes and real agents in them.
//
// # Hosts
//
// NewHosts(t, n) builds n hosts named hostA, hostB, ... Each is a PID, mount
// (with its own /proc), network and UTS namespace created by
//
//	unshare --pid --fork --mount --mount-proc --net --uts --propagation private hostinit reaper hostX FIRSTPID
//
// whose PID 1 (hostinit, a small C program in internal/hostinit built with
// gcc on first use) becomes a session leader, sets the hostname, starts the
// host's PIDs at FIRSTPID (1000 for host A, 2000 for B, ...: a restore needs
// the process's PIDs free on the destination) and reaps orphans. Each host
// has an eth0 with address 10.201.0.N/24, a veth whose other end is a port
// of a bridge in the switch: one more network namespace, held by a hostinit
// process. Hosts share the machine's
// file system, kernel, clock and cgroups; a path means the same file in every
// host, so CRIU images, binaries and status files need no copying.
//
// Everything a bed creates is removed in t.Cleanup, also when the test fails
// or panics: the reaper of each host exits, which makes the kernel kill every
// process in its PID namespace, the switch's holder exits, the namespaces
// and veths vanish with their last process, and the scratch directories are
// deleted. No namespace is named or bind-mounted. The holders also exit when
// the test process dies (each watches a pipe whose writing end only the test
// process holds), so a killed test leaves no running host or switch; the
// next NewHosts removes its scratch directories.
// Only one bed exists on the machine at a time (LockFile): beds of parallel
// tests and test processes wait for each other.
//
// # Running things in a host
//
// Host.Command and Host.Run run a command inside all of a host's namespaces
// (nsenter -t REAPER -a), in the host's "/" (CommandDir for another
// directory). Host.Start starts a long-running process the way CRIU wants
// it: a session leader with stdio on files and no other fds, re-parented to
// the host's reaper; the Proc it returns knows its PID as the host sees it,
// which a migration keeps. Host.Processes lists a host's processes (host
// PID, global PID, state, command line) cheaply enough to sample every few
// milliseconds. Host.Shape limits a host's outgoing bandwidth with tc tbf
// (netem does not exist on the kernels these tests run on); LinkDown and
// LinkUp cut and restore a host's link.
//
// # Workloads
//
// memhog (workload/memhog, C, single-threaded) and gothreads
// (workload/gothreads, Go, several threads) count about every millisecond,
// record the largest wall-clock gap between two counts (the downtime as the
// workload sees it), keep a memory region whose checksum proves it survived
// a migration intact, and write a status file of key=value lines into the
// bed's shared directory. StartMemhog, StartGoThreads, WaitStatus and Verify
// drive them.
//
// # Requirements
//
// The bed needs root, iproute2 (ip, tc), util-linux (unshare, nsenter) and
// gcc; the CRIU tests need criu >= 4.2. RequireRoot and RequireCRIU fail a
// test when CI=true and skip it, with a one-line reason, otherwise.
package e2e
