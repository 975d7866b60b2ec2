// Command demo shows live migration on this machine (`make demo`, as root
// after `make setup`): it creates two simulated hosts (the test bed of
// test/e2e), starts migrated in each, starts a workload on host A that
// counts every millisecond and holds 300 MiB, shows it counting, moves it to
// host B with `migratectl move` and its live progress display, shows it
// counting on host B under the same PID, and removes everything again, also
// when interrupted with Ctrl-C.
package main
