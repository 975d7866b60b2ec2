package criurpc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
)

// LazyPagesOptions are the options of a `criu lazy-pages` daemon.
type LazyPagesOptions struct {
	// ImagesDir holds the dump's images (without pages). Required.
	ImagesDir string
	// WorkDir is where the daemon's unix socket (lazy-pages.socket) and
	// log live; the restore must use the same work directory. ImagesDir
	// when empty.
	WorkDir string
	// LogFile is the log's name inside WorkDir; "lazy-pages.log" when
	// empty.
	LogFile  string
	LogLevel LogLevel
	// Address and Port of the lazy dump's page server, which serves the
	// pages (DumpOptions.LazyPages).
	Address string
	Port    int
}

// LazyPages is a running `criu lazy-pages` daemon: it hands the memory of a
// lazily restored tree (RestoreOptions.LazyPages) to its userfaultfds,
// fetching pages from the dump's page server on demand and in the
// background. Its owner must call Wait or Kill.
//
// CRIU has no RPC request for this daemon, so it runs as `criu lazy-pages`
// with command-line options.
type LazyPages struct {
	// PID of the daemon.
	PID int

	proc    *swrkProc
	logPath string

	mu   sync.Mutex
	done bool
	err  error
}

// StartLazyPages starts a lazy-pages daemon and returns once it listens for
// the restore. A restore may connect to it only after this returns.
func (c *Client) StartLazyPages(ctx context.Context, o LazyPagesOptions) (*LazyPages, error) {
	fail := func(err error) (*LazyPages, error) { return nil, &Error{Op: "lazy-pages", Err: err} }
	if o.ImagesDir == "" || o.Address == "" || o.Port <= 0 {
		return fail(fmt.Errorf("%w: lazy-pages needs an images directory and the dump's page-server address and port", ErrInvalidOptions))
	}
	work := o.WorkDir
	if work == "" {
		work = o.ImagesDir
	}
	logFile := o.LogFile
	if logFile == "" {
		logFile = "lazy-pages.log"
	}
	level := o.LogLevel
	if level == LogDefault {
		level = LogWarn
	}
	// The daemon writes a byte to the status pipe once it listens.
	ready, readyW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer ready.Close()
	args := []string{"lazy-pages",
		"-D", o.ImagesDir, "-W", work, "-o", logFile, "-v" + strconv.Itoa(int(level)),
		"--page-server", "--address", o.Address, "--port", strconv.Itoa(o.Port),
		"--status-fd", "3",
	}
	cmd := exec.Command(c.path(), args...)
	cmd.ExtraFiles = []*os.File{readyW}
	p, err := startProc(cmd)
	readyW.Close()
	if err != nil {
		return fail(err)
	}
	l := &LazyPages{PID: p.pid, proc: p, logPath: filepath.Join(work, logFile)}
	// The read ends with the ready byte, or EOF when the daemon died.
	got := make(chan error, 1)
	go func() {
		b := make([]byte, 1)
		n, err := ready.Read(b)
		if n == 1 {
			err = nil
		} else if err == nil {
			err = ErrCRIUExited
		}
		got <- err
	}()
	select {
	case err = <-got:
	case <-ctx.Done():
		err = ctx.Err()
		l.kill()
		<-got
	}
	if err != nil {
		l.kill()
		<-l.proc.exited
		e := l.failure(err)
		l.proc.stderr.Close()
		return nil, e
	}
	return l, nil
}

func (l *LazyPages) kill() { l.proc.kill(true) }

func (l *LazyPages) failure(cause error) *Error {
	e := &Error{Op: "lazy-pages", Err: cause}
	if errors.Is(cause, ErrCRIUExited) || cause == nil {
		select {
		case <-l.proc.exited:
			if l.proc.waitErr != nil {
				e.Err = fmt.Errorf("%w (%s)", ErrCRIUExited, l.proc.waitErr)
			}
		default:
		}
	}
	sum := readLogSummary(l.logPath)
	e.Msg, e.LogTail = sum.firstErr, sum.tail
	if tail := l.proc.stderrTail(); len(tail) > 0 && e.Msg == "" {
		e.Msg, e.LogTail = tail[len(tail)-1], tail
	}
	return e
}

// Wait waits until the daemon exited, which it does once every page was
// handed to the restored tree, and reports whether it succeeded. When ctx
// ends first the daemon is killed.
func (l *LazyPages) Wait(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return l.err
	}
	l.done = true
	select {
	case <-l.proc.exited:
	case <-ctx.Done():
		l.kill()
		<-l.proc.exited
		l.proc.stderr.Close()
		l.err = &Error{Op: "lazy-pages", Err: ctx.Err()}
		return l.err
	}
	if l.proc.waitErr != nil {
		l.err = l.failure(fmt.Errorf("criu lazy-pages: %w", l.proc.waitErr))
	}
	l.proc.stderr.Close()
	return l.err
}

// Kill kills the daemon and reaps it. A lazily restored tree whose pages
// were not all fetched then faults on its missing memory.
func (l *LazyPages) Kill() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return
	}
	l.done = true
	l.kill()
	<-l.proc.exited
	l.proc.stderr.Close()
	l.err = &Error{Op: "lazy-pages", Err: errors.New("killed")}
}
