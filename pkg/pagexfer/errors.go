package pagexfer

import (
	"errors"
	"fmt"
)

// Sentinel errors; match them with errors.Is.
var (
	// ErrBadBatch is a batch whose envelope is wrong: unknown kind or
	// compression, a length or checksum mismatch, a sequence gap.
	ErrBadBatch = errors.New("invalid page batch")
	// ErrBadRecord is a batch payload that does not parse (see *RecordError).
	ErrBadRecord = errors.New("invalid page batch record")
	// ErrUnknownHash is a reference to page content the store does not hold.
	ErrUnknownHash = errors.New("page content not in store")
	// ErrNoMapping is a parent hole for which the store holds no page.
	ErrNoMapping = errors.New("no page recorded for parent hole")
	// ErrReplayNotStarted is a final batch before StartReplay was called.
	ErrReplayNotStarted = errors.New("final page stream before replay started")
	// ErrReplayStarted is a second StartReplay.
	ErrReplayStarted = errors.New("replay already started")
	// ErrStreamEnded is a page stream that ended before CLOSE.
	ErrStreamEnded = errors.New("page stream ended before CLOSE")
	// ErrUnexpectedCommand is a page-server command that has no place in a
	// dump stream (GET), or commands after CLOSE.
	ErrUnexpectedCommand = errors.New("unexpected page-server command")
	// ErrPageServer is a failure reply from CRIU's page server.
	ErrPageServer = errors.New("page server refused the stream")
	// ErrClosed is use of a closed Sender, Receiver or Store.
	ErrClosed = errors.New("closed")
)

// RecordError reports where in a batch payload parsing failed.
type RecordError struct {
	Seq    uint64 // the batch's sequence number
	Offset int    // byte offset in the uncompressed payload
	Err    error  // ErrBadRecord or a psproto error
	Detail string
}

func (e *RecordError) Error() string {
	return fmt.Sprintf("batch %d at offset %d: %v: %s", e.Seq, e.Offset, e.Err, e.Detail)
}

func (e *RecordError) Unwrap() error { return e.Err }
