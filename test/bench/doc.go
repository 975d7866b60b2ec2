// Command bench measures live migration with migrated against the ways
// processes are migrated with CRIU today, on two simulated hosts of this
// machine (the test bed of test/e2e), and writes a Markdown report, CSV
// files and PNG plots.
//
// Methods, each moving one running workload from one host to the other:
//
//   - cold: criu dump to a tmpfs directory on the source, copy the images
//     over the link (netcopy, a tar stream over TCP), criu restore on the
//     destination: what checkpoint export/import tools do.
//   - pageserver: criu page-server on the destination, criu dump
//     --page-server on the source, copy the remaining images, restore: what
//     runc's --page-server does.
//   - stopcopy, precopy, precopy-zstd: migratectl move with --mode stopcopy,
//     --mode precopy, and --mode precopy --compress zstd.
//   - floor: criu dump to tmpfs on the source and criu restore from the same
//     tmpfs directory on the destination. Both hosts share this machine's
//     kernel and tmpfs, so no byte crosses the link: it is the least any
//     full-dump method can freeze a process for. It does not depend on the
//     link and runs on the unshaped one only.
//
// The workload alternates between the hosts: every run moves it from where
// it is to the other host, so one workload process serves every method and
// run of a case, and its memory is verified at the end of the case.
//
// Downtime "seen" is the largest gap of CLOCK_REALTIME the workload noticed
// (memhog checks it every millisecond; the gap is reset before each run).
// Downtime "reported" is what the tool says: migrated's downtime_ms, and
// for the CRIU methods the wall time from the start of criu dump to the end
// of criu restore (what a script timing its steps sees). Total time is
// migrated's total_ms, and dump start to restore end for the CRIU methods.
// Wire bytes are the bytes both hosts' eth0 sent during the run. CPU is the
// user+system time of the tools: for migrated the two daemons including
// their CRIU children, for the CRIU methods the criu and netcopy processes.
// Peak memory is the daemon's VmHWM (reset before each run; its CRIU
// children are not included) or the largest maxrss of the CRIU method's
// processes on that host.
//
// Usage (root, CRIU >= 4.2):
//
//	go run ./test/bench [--quick] [--runs N] [--out DIR] [--only REGEXP] [-v]
package main
