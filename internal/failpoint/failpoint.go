// Package failpoint injects faults at named points of a migration, for
// tests. Failpoints are compiled in but inert unless the MIGRATED_FAILPOINTS
// environment variable (or the daemon's --failpoints flag) names them:
//
//	MIGRATED_FAILPOINTS="after-dump=error;dest-restore=stall(5s);after-decision=kill"
//
// Actions: error (the point fails with ErrInjected), stall(DURATION)
// (the point blocks for DURATION or until its context ends), kill (the
// process kills itself with SIGKILL, as a crash would), and
// N*ACTION to fire only on the N-th pass (1*kill fires once, on the
// first). Every firing is logged.
package failpoint

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// EnvVar names the environment variable that enables failpoints.
const EnvVar = "MIGRATED_FAILPOINTS"

// ErrInjected is the error an "error" failpoint returns.
var ErrInjected = errors.New("injected fault")

type action struct {
	kind  string // error, stall, kill
	stall time.Duration
	nth   int // fire only on this pass; 0 = every pass
}

// Set is a parsed set of failpoints. The nil *Set is inert.
type Set struct {
	log    hclog.Logger
	mu     sync.Mutex
	points map[string]action
	passes map[string]int
}

// Parse reads a failpoint specification; an empty spec gives a nil Set.
func Parse(spec string, log hclog.Logger) (*Set, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, nil
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s := &Set{log: log, points: map[string]action{}, passes: map[string]int{}}
	for _, item := range strings.Split(spec, ";") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		name, act, ok := strings.Cut(item, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("failpoint %q: want NAME=ACTION", item)
		}
		var a action
		if n, rest, ok := strings.Cut(act, "*"); ok {
			k, err := strconv.Atoi(n)
			if err != nil || k < 1 {
				return nil, fmt.Errorf("failpoint %q: bad pass number %q", item, n)
			}
			a.nth, act = k, rest
		}
		switch {
		case act == "error", act == "kill":
			a.kind = act
		case strings.HasPrefix(act, "stall(") && strings.HasSuffix(act, ")"):
			d, err := time.ParseDuration(act[len("stall(") : len(act)-1])
			if err != nil {
				return nil, fmt.Errorf("failpoint %q: %w", item, err)
			}
			a.kind, a.stall = "stall", d
		default:
			return nil, fmt.Errorf("failpoint %q: unknown action %q (error, stall(DUR), kill)", item, act)
		}
		s.points[strings.TrimSpace(name)] = a
	}
	return s, nil
}

// At runs the failpoint named point, if any.
func (s *Set) At(ctx context.Context, point string) error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	a, ok := s.points[point]
	s.passes[point]++
	pass := s.passes[point]
	s.mu.Unlock()
	if !ok || (a.nth != 0 && a.nth != pass) {
		return nil
	}
	s.log.Warn("failpoint fired", "point", point, "action", a.kind, "pass", pass)
	switch a.kind {
	case "error":
		return fmt.Errorf("failpoint %s: %w", point, ErrInjected)
	case "stall":
		t := time.NewTimer(a.stall)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	case "kill":
		_ = syscall.Kill(syscall.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not delivered synchronously
	}
	return nil
}
