package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/migrated/migrated/test/bench/scope"
	"github.com/migrated/migrated/test/e2e"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// Workload size: a few hundred MiB, a small part of it rewritten all the time.
const (
	memMiB = 300
	hotMiB = 8
)

func run(ctx context.Context, stdout, stderr io.Writer) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates namespaces and runs CRIU: run it as root (sudo make demo)")
	}
	if err := scope.WaitForBed(ctx, stdout); err != nil {
		return err
	}
	defer e2e.RemoveBinaries()
	root := scope.New(ctx, "demo", stderr)
	fmt.Fprintln(stdout, "setting up two test hosts (namespaces on this machine) with migrated on each ...")
	err := root.Run("demo", func(t testing.TB) { demo(ctx, t, stdout) })
	root.Finish()
	fmt.Fprintln(stdout, "cleaned up: hosts, agents and workload are gone.")
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	return err
}

func demo(ctx context.Context, t testing.TB, out io.Writer) {
	e2e.RequireCRIU(t)
	hs := e2e.NewHosts(t, 2)
	A, B := hs[0], hs[1]
	srcAgent := e2e.StartAgent(t, A)
	dstAgent := e2e.StartAgent(t, B)
	fmt.Fprintf(out, "  %s %s and %s %s, migrated listening on %s and %s\n\n", A.Name, A.IP, B.Name, B.IP, srcAgent.Addr, dstAgent.Addr)

	fmt.Fprintf(out, "starting the workload on %s: it counts every millisecond and holds %d MiB (%d MiB rewritten every second)\n", A.Name, memMiB, hotMiB)
	p := e2e.StartMemhog(t, A, e2e.MemhogOptions{MemMiB: memMiB, HotMiB: hotMiB})
	if !watch(ctx, t, out, p, 3*time.Second) {
		return
	}

	fmt.Fprintf(out, "\n$ migratectl move %d --to %s\n", p.PID, dstAgent.Addr)
	e2e.ResetGap(t, p)
	before, err := p.Status()
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	cmd := A.Command(ctx, srcAgent.CtlBin, "--socket", srcAgent.Socket, "move", strconv.Itoa(p.PID), "--to", dstAgent.Addr)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return
		}
		t.Fatalf("migratectl move: %v", err)
	}
	fmt.Fprintln(out)

	q := p.On(B)
	if _, err := p.Info(); err == nil {
		t.Fatalf("pid %d still exists on %s", p.PID, A.Name)
	}
	if info, err := q.Info(); err != nil {
		t.Fatalf("pid %d is not on %s: %v", p.PID, B.Name, err)
	} else {
		fmt.Fprintf(out, "pid %d is gone from %s and runs on %s (%s, state %c)\n", p.PID, A.Name, B.Name, info.Comm, info.State)
	}
	if !watch(ctx, t, out, q, 3*time.Second) {
		return
	}
	s, err := q.Status()
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	if s.Counter < before.Counter {
		t.Fatalf("the counter went back: %d on %s after %d on %s", s.Counter, B.Name, before.Counter, A.Name)
	}
	v := e2e.Verify(t, q)
	if v.Verify != "ok" || v.ColdSumNow != before.ColdSum {
		t.Fatalf("memory changed across the move: verify=%s, checksum %s, before %s", v.Verify, v.ColdSumNow, before.ColdSum)
	}
	fmt.Fprintf(out, "\nthe counter went on from %d without a reset; the largest pause the workload noticed was %d ms; its memory checksum is unchanged (%s)\n",
		before.Counter, s.MaxGap.Milliseconds(), v.ColdSumNow)
}

// watch prints the workload's counter as read from its status file for d;
// it returns false when ctx ends first.
func watch(ctx context.Context, t testing.TB, out io.Writer, p *e2e.Proc, d time.Duration) bool {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		s, err := p.Status()
		if err != nil {
			t.Fatalf("status of pid %d: %v", p.PID, err)
		}
		fmt.Fprintf(out, "  %s  pid %d  counter %8d\n", p.Host.Name, s.PID, s.Counter)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(500 * time.Millisecond):
		}
	}
	return true
}
