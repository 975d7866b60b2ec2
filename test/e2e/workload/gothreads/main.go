package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "gothreads:", err)
		os.Exit(1)
	}
}

type counter struct {
	n      atomic.Uint64
	maxGap atomic.Int64 // microseconds
	_      [48]byte     // keep counters on separate cache lines
}

func run(args []string) error {
	fs := flag.NewFlagSet("gothreads", flag.ContinueOnError)
	threads := fs.Int("threads", 4, "counting threads")
	memMiB := fs.Int("mem", 16, "memory with a checksum, MiB")
	status := fs.String("status", "", "status file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *threads < 1 || *memMiB < 0 || *status == "" {
		return fmt.Errorf("need --threads >= 1, --mem >= 0 and --status")
	}

	mem := make([]byte, *memMiB<<20)
	fill(mem)
	sum := checksum(mem)

	counters := make([]counter, *threads)
	for i := range counters {
		c := &counters[i]
		go func() {
			runtime.LockOSThread()
			last := time.Now().UnixMicro()
			for {
				time.Sleep(time.Millisecond)
				now := time.Now().UnixMicro()
				if g := now - last; g > c.maxGap.Load() {
					c.maxGap.Store(g)
				}
				last = now
				c.n.Add(1)
			}
		}()
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	verify, verifyCount, sumNow := "none", 0, uint64(0)
	tick := time.NewTicker(20 * time.Millisecond)
	for {
		select {
		case s := <-sigs:
			switch s {
			case syscall.SIGUSR1:
				sumNow = checksum(mem)
				verify = "bad"
				if sumNow == sum {
					verify = "ok"
				}
				verifyCount++
			case syscall.SIGUSR2:
				for i := range counters {
					counters[i].maxGap.Store(0)
				}
			}
		case <-tick.C:
		}
		var total uint64
		var maxGap int64
		each := make([]string, len(counters))
		for i := range counters {
			n := counters[i].n.Load()
			total += n
			each[i] = fmt.Sprint(n)
			maxGap = max(maxGap, counters[i].maxGap.Load())
		}
		body := fmt.Sprintf("pid=%d\ncounter=%d\nmax_gap_us=%d\ntime_us=%d\nmem_mib=%d\nhot_mib=0\n"+
			"cold_sum=%016x\nverify=%s\nverify_count=%d\ncold_sum_now=%016x\nthreads=%d\nthread_counters=%s\n",
			os.Getpid(), total, maxGap, time.Now().UnixMicro(), *memMiB, sum, verify, verifyCount, sumNow,
			len(counters), strings.Join(each, ","))
		tmp := *status + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o644); err == nil {
			os.Rename(tmp, *status)
		}
	}
}

func fill(b []byte) {
	x := uint64(0x9e3779b97f4a7c15)
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
}

func checksum(b []byte) uint64 {
	h := uint64(0xcbf29ce484222325)
	for _, c := range b {
		h = (h ^ uint64(c)) * 0x100000001b3
	}
	return h
}
