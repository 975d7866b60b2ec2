package phaul

import "errors"

// Sentinel errors callers branch on.
var (
	// ErrNoProcess: the PID to move does not exist on the source.
	ErrNoProcess = errors.New("no such process")
	// ErrProcessExited: the process exited by itself during the migration.
	ErrProcessExited = errors.New("process exited")
	// ErrPreflight: a preflight check failed; nothing was touched.
	ErrPreflight = errors.New("preflight failed")
	// ErrUnknownMigration: no migration with that id.
	ErrUnknownMigration = errors.New("unknown migration")
	// ErrBadID: a migration id with characters other than letters, digits,
	// '-' and '_', or longer than 64.
	ErrBadID = errors.New("invalid migration id")
	// ErrTooLate: cancel after the commit point.
	ErrTooLate = errors.New("past the commit point")
	// ErrCanceled: the migration was cancelled and the status quo restored.
	ErrCanceled = errors.New("migration cancelled")
	// ErrExists: a migration with that id already exists.
	ErrExists = errors.New("migration already exists")
	// ErrBadState: a peer call that does not fit the migration's state.
	ErrBadState = errors.New("call out of order for the migration's state")
	// ErrBusy: too many concurrent migrations.
	ErrBusy = errors.New("too many concurrent migrations")
	// ErrDiscarded: the destination answers a commit with the news that it
	// holds no copy of the migration's process (its restored copy was lost,
	// for instance to a reboot, and it has recorded the migration as
	// aborted). The source's frozen copy is then the only one, and resumes.
	ErrDiscarded = errors.New("the destination holds no copy of the process")
)

// PhaseError is a migration failure: which phase failed, where the process
// runs now and what to do.
type PhaseError struct {
	ID       string
	Phase    Phase
	Err      error
	Location string // "source", "destination", "unknown"
	Advice   string
}

func (e *PhaseError) Error() string {
	s := e.Phase.String() + " failed: " + e.Err.Error()
	switch e.Location {
	case "source":
		s += "; the process runs on the source"
	case "destination":
		s += "; the process runs on the destination"
	case "unknown":
		s += "; the process's location is being recovered"
	}
	if e.Advice != "" {
		s += "; " + e.Advice
	}
	return s
}

func (e *PhaseError) Unwrap() error { return e.Err }
