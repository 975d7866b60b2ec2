package scope

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// T is a testing.TB for programs that use the test bed of test/e2e outside
// `go test` (the bed reports through a testing.TB). A scope collects cleanups and runs
// them, last first, when it ends; Fatal and Skip end the scope early (through
// a panic that Run recovers) the way they end a test.
type T struct {
	testing.TB // nil: methods not implemented below are never called by the bed

	name string
	log  io.Writer
	ctx  context.Context

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	skipped  bool
	msgs     []string
	tempDirs []string
}

// scopeExit is what Fatal, FailNow and Skip panic with.
type scopeExit struct{ skip bool }

// New returns a root scope named name that logs to log; ctx is what Context
// returns. End it with Finish.
func New(ctx context.Context, name string, log io.Writer) *T {
	return &T{name: name, log: log, ctx: ctx}
}

// child returns a scope nested in s.
func (s *T) child(name string) *T {
	return New(s.ctx, s.name+"/"+name, s.log)
}

// Run runs fn in a child scope of s, runs the child's cleanups and returns
// an error describing why it failed (nil when it did not).
func (s *T) Run(name string, fn func(t testing.TB)) (err error) {
	c := s.child(name)
	func() {
		defer func() {
			if r := recover(); r != nil {
				if _, ok := r.(scopeExit); !ok {
					c.fail(fmt.Sprintf("panic: %v", r))
				}
			}
		}()
		fn(c)
	}()
	c.Finish()
	if c.Failed() {
		return fmt.Errorf("%s: %s", c.name, strings.Join(c.msgs, "; "))
	}
	return nil
}

// Finish runs the scope's cleanups, last registered first. A cleanup that
// fails marks the scope failed and does not stop the others.
func (s *T) Finish() {
	for {
		s.mu.Lock()
		n := len(s.cleanups)
		if n == 0 {
			s.mu.Unlock()
			break
		}
		f := s.cleanups[n-1]
		s.cleanups = s.cleanups[:n-1]
		s.mu.Unlock()
		func() {
			defer func() {
				if r := recover(); r != nil {
					if _, ok := r.(scopeExit); !ok {
						s.fail(fmt.Sprintf("panic in cleanup: %v", r))
					}
				}
			}()
			f()
		}()
	}
	for _, d := range s.tempDirs {
		os.RemoveAll(d)
	}
}

func (s *T) fail(msg string) {
	s.mu.Lock()
	s.failed = true
	if msg != "" {
		s.msgs = append(s.msgs, msg)
	}
	s.mu.Unlock()
	if msg != "" {
		fmt.Fprintf(s.log, "%s: FAIL: %s\n", s.name, msg)
	}
}

func (s *T) Helper()      {}
func (s *T) Name() string { return s.name }
func (s *T) Log(args ...any) {
	fmt.Fprintf(s.log, "%s: %s\n", s.name, strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}
func (s *T) Logf(format string, args ...any) {
	fmt.Fprintf(s.log, "%s: %s\n", s.name, fmt.Sprintf(format, args...))
}
func (s *T) Error(args ...any) { s.fail(strings.TrimSuffix(fmt.Sprintln(args...), "\n")) }
func (s *T) Errorf(format string, args ...any) {
	s.fail(fmt.Sprintf(format, args...))
}
func (s *T) Fail() { s.fail("") }
func (s *T) FailNow() {
	s.fail("")
	panic(scopeExit{})
}
func (s *T) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}
func (s *T) Fatal(args ...any) {
	s.Error(args...)
	panic(scopeExit{})
}
func (s *T) Fatalf(format string, args ...any) {
	s.Errorf(format, args...)
	panic(scopeExit{})
}
func (s *T) Skip(args ...any) {
	s.skip(strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}
func (s *T) Skipf(format string, args ...any) { s.skip(fmt.Sprintf(format, args...)) }

// SkipNow ends the scope. Outside a test nothing may be skipped silently,
// so a skip (a missing prerequisite such as root or CRIU) fails the scope.
func (s *T) SkipNow() { s.skip("skipped") }

func (s *T) skip(reason string) {
	s.mu.Lock()
	s.skipped = true
	s.mu.Unlock()
	s.fail("cannot run: " + reason)
	panic(scopeExit{skip: true})
}
func (s *T) Skipped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.skipped
}
func (s *T) Cleanup(f func()) {
	s.mu.Lock()
	s.cleanups = append(s.cleanups, f)
	s.mu.Unlock()
}
func (s *T) TempDir() string {
	d, err := os.MkdirTemp("", "mgbench-"+filepath.Base(s.name))
	if err != nil {
		s.Fatalf("TempDir: %v", err)
	}
	s.mu.Lock()
	s.tempDirs = append(s.tempDirs, d)
	s.mu.Unlock()
	return d
}
func (s *T) Context() context.Context { return s.ctx }
func (s *T) Output() io.Writer        { return s.log }
