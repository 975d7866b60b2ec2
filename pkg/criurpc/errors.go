package criurpc

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

var (
	// ErrNoMemTracking means the kernel has no soft-dirty memory tracking,
	// so CRIU cannot pre-dump or dump with TrackMem. The process was not
	// touched.
	ErrNoMemTracking = errors.New("kernel has no soft-dirty memory tracking (criu check --feature mem_dirty_track fails): pre-dump and incremental dumps are impossible")

	// ErrCRIUExited means the CRIU process exited or was killed before it
	// answered the request.
	ErrCRIUExited = errors.New("criu exited before answering")

	// ErrProtocol means CRIU sent a message that is not a valid answer to
	// the request (undecodable, truncated, or of the wrong type).
	ErrProtocol = errors.New("unexpected message from criu")

	// ErrSessionClosed means the swrk session was already closed or used up
	// (for example a second Dump on a PreDumpSession).
	ErrSessionClosed = errors.New("criu session closed")

	// ErrInvalidOptions means the options cannot be turned into a request
	// (for example a dump without a PID or without an images directory).
	ErrInvalidOptions = errors.New("invalid criu options")

	// ErrNotifyFailed is wrapped by the error of an operation that CRIU
	// failed because a Notifier returned an error.
	ErrNotifyFailed = errors.New("notification handler failed")
)

// Error is a failed CRIU operation. It unwraps to CRIU's errno (a
// unix.Errno, when CRIU reported one) and to a cause such as ErrCRIUExited,
// ErrProtocol, ErrNoMemTracking, ErrNotifyFailed or a context error.
type Error struct {
	// Op names the operation: "dump", "pre-dump", "restore", "page-server",
	// "check", "cpuinfo-dump", "cpuinfo-check", "feature-check", "version",
	// "wait-pid".
	Op string
	// PID is the target of a dump or pre-dump, 0 otherwise.
	PID int
	// Errno is the errno CRIU reported (cr_errno), 0 when it reported none.
	Errno unix.Errno
	// Msg is the most meaningful explanation found: CRIU's own error
	// message, the first error line of its log, or what the client saw.
	Msg string
	// LogTail holds the last meaningful lines of CRIU's log for this
	// operation, oldest first, without timestamps.
	LogTail []string
	// Err is the cause on the client side, if any.
	Err error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	if e.PID > 0 {
		fmt.Fprintf(&b, " of pid %d", e.PID)
	}
	b.WriteString(" failed")
	msg := e.Msg
	if msg == "" && e.Err != nil {
		msg = e.Err.Error()
	}
	if msg != "" {
		b.WriteString(": ")
		b.WriteString(msg)
	}
	if e.Err != nil && !strings.Contains(msg, e.Err.Error()) {
		b.WriteString(" (")
		b.WriteString(e.Err.Error())
		b.WriteString(")")
	}
	if e.Errno != 0 && !strings.Contains(msg, e.Errno.Error()) {
		fmt.Fprintf(&b, " [errno %d: %s]", int(e.Errno), e.Errno.Error())
	}
	return b.String()
}

// Unwrap returns the errno and the client-side cause, so that errors.Is
// works with both unix.Errno values and this package's sentinels.
func (e *Error) Unwrap() []error {
	var errs []error
	if e.Errno != 0 {
		errs = append(errs, e.Errno)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}
