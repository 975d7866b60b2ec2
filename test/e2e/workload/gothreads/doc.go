// Command gothreads is the multi-threaded workload of migrated's e2e tests.
//
// Several goroutines, each locked to its own OS thread, count every tick
// (about 1 ms) and record the largest wall-clock gap between two of their
// ticks. A memory region of pseudo-random bytes carries a checksum computed
// at start. The main goroutine writes the same status file format as
// memhog (key=value lines, written to a temporary file and renamed) about
// every 20 ms, with threads= and thread_counters= added. SIGUSR1 recomputes
// the checksum (verify=ok|bad, cold_sum_now, verify_count); SIGUSR2 resets
// max_gap_us.
//
// Usage:
//
//	gothreads [--threads N] [--mem MIB] --status PATH
package main
