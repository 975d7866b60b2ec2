package main

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

// scopeTB is a testing.TB for code that runs outside `go test`: the test bed
// of test/e2e reports through a testing.TB. A scope collects cleanups and runs
// them, last first, when it ends; Fatal and Skip end the scope early (through
// a panic that runScope recovers) the way they end a test.
type scopeTB struct {
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

func newScope(ctx context.Context, name string, log io.Writer) *scopeTB {
	return &scopeTB{name: name, log: log, ctx: ctx}
}

// child returns a scope nested in s.
func (s *scopeTB) child(name string) *scopeTB {
	return newScope(s.ctx, s.name+"/"+name, s.log)
}

// runScope runs fn in a child scope of s, runs the child's cleanups and
// returns an error describing why it failed (nil when it did not).
func (s *scopeTB) runScope(name string, fn func(t testing.TB)) (err error) {
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
	c.finish()
	if c.Failed() {
		return fmt.Errorf("%s: %s", c.name, strings.Join(c.msgs, "; "))
	}
	return nil
}

// finish runs the scope's cleanups, last registered first. A cleanup that
// fails marks the scope failed and does not stop the others.
func (s *scopeTB) finish() {
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

func (s *scopeTB) fail(msg string) {
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

func (s *scopeTB) Helper()      {}
func (s *scopeTB) Name() string { return s.name }
func (s *scopeTB) Log(args ...any) {
	fmt.Fprintf(s.log, "%s: %s\n", s.name, strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}
func (s *scopeTB) Logf(format string, args ...any) {
	fmt.Fprintf(s.log, "%s: %s\n", s.name, fmt.Sprintf(format, args...))
}
func (s *scopeTB) Error(args ...any) { s.fail(strings.TrimSuffix(fmt.Sprintln(args...), "\n")) }
func (s *scopeTB) Errorf(format string, args ...any) {
	s.fail(fmt.Sprintf(format, args...))
}
func (s *scopeTB) Fail() { s.fail("") }
func (s *scopeTB) FailNow() {
	s.fail("")
	panic(scopeExit{})
}
func (s *scopeTB) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}
func (s *scopeTB) Fatal(args ...any) {
	s.Error(args...)
	panic(scopeExit{})
}
func (s *scopeTB) Fatalf(format string, args ...any) {
	s.Errorf(format, args...)
	panic(scopeExit{})
}
func (s *scopeTB) Skip(args ...any) {
	s.skip(strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}
func (s *scopeTB) Skipf(format string, args ...any) { s.skip(fmt.Sprintf(format, args...)) }

// SkipNow ends the scope. Outside a test nothing may be skipped silently,
// so a skip (a missing prerequisite such as root or CRIU) fails the scope.
func (s *scopeTB) SkipNow() { s.skip("skipped") }

func (s *scopeTB) skip(reason string) {
	s.mu.Lock()
	s.skipped = true
	s.mu.Unlock()
	s.fail("cannot run: " + reason)
	panic(scopeExit{skip: true})
}
func (s *scopeTB) Skipped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.skipped
}
func (s *scopeTB) Cleanup(f func()) {
	s.mu.Lock()
	s.cleanups = append(s.cleanups, f)
	s.mu.Unlock()
}
func (s *scopeTB) TempDir() string {
	d, err := os.MkdirTemp("", "mgbench-"+filepath.Base(s.name))
	if err != nil {
		s.Fatalf("TempDir: %v", err)
	}
	s.mu.Lock()
	s.tempDirs = append(s.tempDirs, d)
	s.mu.Unlock()
	return d
}
func (s *scopeTB) Context() context.Context { return s.ctx }
func (s *scopeTB) Output() io.Writer        { return s.log }
