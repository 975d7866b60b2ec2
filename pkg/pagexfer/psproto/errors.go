package psproto

import (
	"errors"
	"fmt"
)

// Sentinel errors a *DecodeError wraps; match them with errors.Is.
var (
	// ErrUnknownOp is a header whose op is not a page-server command.
	ErrUnknownOp = errors.New("unknown page-server command")
	// ErrBadFlags is a flag combination CRIU never sends for the op.
	ErrBadFlags = errors.New("invalid flags for command")
	// ErrBadRange is a zero, unaligned or out-of-address-space page range,
	// or a non-zero range on a command that carries none.
	ErrBadRange = errors.New("invalid page range")
	// ErrUnknownImage is a dst_id whose type is neither pagemap nor shmem.
	ErrUnknownImage = errors.New("unknown image type in dst_id")
	// ErrNotOpen is a page command for an image that was not opened last.
	ErrNotOpen = errors.New("page command for an image that is not open")
	// ErrTruncated is a stream that ends inside a header or a payload.
	ErrTruncated = errors.New("truncated page-server stream")
	// ErrPayloadPending is Next called while the current command's payload
	// has not been read completely.
	ErrPayloadPending = errors.New("payload of the previous command not read")
	// ErrBadHeaderSize is a header size other than 24 or 32.
	ErrBadHeaderSize = errors.New("page-server header size must be 24 or 32")
	// ErrBadReply is a reply of the wrong size or value.
	ErrBadReply = errors.New("invalid page-server reply")
)

// DecodeError reports where in a page-server stream decoding failed.
type DecodeError struct {
	// Offset is the byte offset in the stream of the field that is wrong,
	// or where the stream ended early.
	Offset int64
	// Err is one of the package's sentinel errors, or an I/O error.
	Err error
	// Detail says what was found.
	Detail string
}

func (e *DecodeError) Error() string {
	if e.Detail == "" {
		return fmt.Sprintf("page-server stream at offset %d: %v", e.Offset, e.Err)
	}
	return fmt.Sprintf("page-server stream at offset %d: %v: %s", e.Offset, e.Err, e.Detail)
}

func (e *DecodeError) Unwrap() error { return e.Err }
