package agent

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/migrated/migrated/pkg/phaul"
)

// errorCodes maps the engine's sentinels to gRPC codes, in both directions.
var errorCodes = []struct {
	err  error
	code codes.Code
}{
	{phaul.ErrUnknownMigration, codes.NotFound},
	{phaul.ErrNoProcess, codes.NotFound},
	{phaul.ErrBadID, codes.InvalidArgument},
	{phaul.ErrBadState, codes.FailedPrecondition},
	{phaul.ErrTooLate, codes.FailedPrecondition},
	{phaul.ErrPreflight, codes.FailedPrecondition},
	{phaul.ErrBusy, codes.ResourceExhausted},
	{phaul.ErrExists, codes.AlreadyExists},
	{phaul.ErrCanceled, codes.Canceled},
	{phaul.ErrDiscarded, codes.Aborted},
	{ErrPermission, codes.PermissionDenied},
	{ErrInvalid, codes.InvalidArgument},
}

// Errors of the adapter itself.
var (
	// ErrPermission: the caller may not make this call.
	ErrPermission = errors.New("permission denied")
	// ErrInvalid: a request field is out of range.
	ErrInvalid = errors.New("invalid request")
)

// toStatus is the one place engine errors become gRPC status errors.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok && !isWrapped(err) {
		return err
	}
	for _, ec := range errorCodes {
		if errors.Is(err, ec.err) {
			return status.Error(ec.code, err.Error())
		}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func isWrapped(err error) bool { return errors.Unwrap(err) != nil }

// fromStatus is the one place gRPC status errors become engine errors: the
// code selects the sentinel, the message is kept.
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	msg := st.Message()
	switch st.Code() {
	case codes.NotFound:
		return &remoteError{msg: msg, err: phaul.ErrUnknownMigration}
	case codes.InvalidArgument:
		return &remoteError{msg: msg, err: ErrInvalid}
	case codes.FailedPrecondition:
		return &remoteError{msg: msg, err: phaul.ErrBadState}
	case codes.ResourceExhausted:
		return &remoteError{msg: msg, err: phaul.ErrBusy}
	case codes.AlreadyExists:
		return &remoteError{msg: msg, err: phaul.ErrExists}
	case codes.PermissionDenied, codes.Unauthenticated:
		return &remoteError{msg: msg, err: ErrPermission}
	case codes.Aborted:
		return &remoteError{msg: msg, err: phaul.ErrDiscarded}
	case codes.Canceled:
		return &remoteError{msg: msg, err: context.Canceled}
	case codes.DeadlineExceeded:
		return &remoteError{msg: msg, err: context.DeadlineExceeded}
	case codes.Unavailable:
		return &remoteError{msg: "unreachable: " + msg, err: ErrUnavailable}
	}
	return &remoteError{msg: msg, err: fmt.Errorf("%s", st.Code())}
}

// ErrUnavailable: the peer could not be reached.
var ErrUnavailable = errors.New("peer unavailable")

// remoteError carries a peer's message and the sentinel its code maps to.
type remoteError struct {
	msg string
	err error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.err }
