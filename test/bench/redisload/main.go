// Command redisload is the benchmark's redis workload: it starts
// redis-server as its child (listening on a unix socket only, no
// persistence), loads it with --keys keys (DEBUG POPULATE: key:0, key:1, ...)
// and then overwrites a random one of them about every millisecond, waiting
// for each reply. Like memhog of test/e2e it records the largest gap of the
// wall clock (CLOCK_REALTIME) between two successful writes, the downtime as
// a client of the server sees it, and writes a status file of key=value
// lines every 20 ms (pid, counter, max_gap_us, time_us, verify, ...).
//
// The whole tree (redisload and redis-server, and the unix socket between
// them) is what a migration moves. SIGUSR2 resets the largest gap; SIGUSR1
// checks the data: the number of keys, and the values of the last keys
// written, and reports verify=ok|bad.
//
//	redisload --keys N --sock PATH --status PATH
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "redisload:", err)
		os.Exit(1)
	}
}

// conn is a minimal RESP client.
type conn struct {
	c net.Conn
	r *bufio.Reader
}

func (c *conn) do(args ...string) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(c.c, b.String()); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return "", errors.New("empty reply")
	}
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", errors.New(line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", fmt.Errorf("bulk reply %q", line)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("unexpected reply %q", line)
}

func run(args []string) error {
	fs := flag.NewFlagSet("redisload", flag.ContinueOnError)
	keys := fs.Int("keys", 1000000, "keys to load")
	sock := fs.String("sock", "", "unix socket of the server")
	status := fs.String("status", "", "status file")
	server := fs.String("server", "redis-server", "redis-server binary")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sock == "" || *status == "" || *keys <= 0 {
		return errors.New("--sock and --status are required, --keys > 0")
	}
	os.Remove(*sock)
	srv := exec.Command(*server, "--port", "0", "--unixsocket", *sock, "--unixsocketperm", "700",
		"--save", "", "--appendonly", "no", "--enable-debug-command", "local", "--daemonize", "no")
	srv.Stdout, srv.Stderr = os.Stderr, os.Stderr
	srv.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := srv.Start(); err != nil {
		return err
	}
	var c *conn
	deadline := time.Now().Add(10 * time.Second)
	for {
		nc, err := net.Dial("unix", *sock)
		if err == nil {
			c = &conn{c: nc, r: bufio.NewReader(nc)}
			break
		}
		if time.Now().After(deadline) {
			srv.Process.Kill()
			return fmt.Errorf("redis-server did not come up: %w", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := c.do("DEBUG", "POPULATE", strconv.Itoa(*keys)); err != nil {
		return fmt.Errorf("populate: %w", err)
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)

	type write struct{ key, val string }
	var recent [64]write
	var counter, maxGap, verifyCount uint64
	verify, sumNow := "none", ""
	last, lastStatus := time.Now(), time.Time{}
	rng := rand.New(rand.NewPCG(1, 2))
	for {
		time.Sleep(time.Millisecond)
		k := "key:" + strconv.Itoa(rng.IntN(*keys))
		v := fmt.Sprintf("value:%d:%x", counter, rng.Uint64())
		if _, err := c.do("SET", k, v); err != nil {
			return fmt.Errorf("set: %w", err)
		}
		recent[counter%uint64(len(recent))] = write{k, v}
		counter++
		now := time.Now().Round(0) // wall clock, not the monotonic reading
		if gap := now.Sub(last.Round(0)); gap > 0 && uint64(gap.Microseconds()) > maxGap {
			maxGap = uint64(gap.Microseconds())
		}
		last = now
		force := false
		select {
		case s := <-sigs:
			if s == syscall.SIGUSR2 {
				maxGap = 0
				break
			}
			verify, sumNow = "ok", "redis"
			if n, err := c.do("DBSIZE"); err != nil || n != strconv.Itoa(*keys) {
				verify, sumNow = "bad", fmt.Sprintf("dbsize=%s(%v)", n, err)
			}
			for i, w := range recent {
				if w.key == "" {
					continue
				}
				got, err := c.do("GET", w.key)
				// A later write may have hit the same key, so only the
				// latest write must read back exactly.
				latest := uint64(i) == (counter-1)%uint64(len(recent))
				if err != nil || latest && got != w.val || !strings.HasPrefix(got, "value:") {
					verify, sumNow = "bad", "get "+w.key
				}
			}
			verifyCount++
			force = true
			last = time.Now()
		default:
		}
		if force || now.Sub(lastStatus) >= 20*time.Millisecond {
			st := fmt.Sprintf("pid=%d\ncounter=%d\nmax_gap_us=%d\ntime_us=%d\ncold_sum=redis\nverify=%s\nverify_count=%d\ncold_sum_now=%s\n",
				os.Getpid(), counter, maxGap, now.UnixMicro(), verify, verifyCount, sumNow)
			if err := os.WriteFile(*status+".tmp", []byte(st), 0o644); err == nil {
				os.Rename(*status+".tmp", *status)
			}
			lastStatus = now
		}
	}
}
