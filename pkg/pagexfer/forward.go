package pagexfer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// DumpStats describe one forwarded dump stream.
type DumpStats struct {
	Images   uint64        // images opened (OPEN/OPEN2)
	Commands uint64        // page-server commands read
	Pages    uint64        // pages CRIU sent with data
	Bytes    int64         // bytes read from CRIU
	Counters Counters      // the Sender's counters for this dump
	Duration time.Duration // from the first read to the CLOSE acknowledgement
}

// ForwardDump serves CRIU's dump side on conn: our end of the socket whose
// other end CRIU writes its page stream to (ps.fd in a CRIU RPC dump, or a
// connection CRIU made to a page-server address). It keeps CRIU's order
// of commands and turns them into final batches on s: each page goes as a
// zero mark, a reference to content the destination holds, or its content.
// It answers OPEN2 with "no parent" (the destination fills every page) and
// PARENT with 0, and acknowledges CLOSE only after the last batch was taken
// by the sink, then returns. conn is not closed.
//
// A deadline is set on conn when ctx ends, if conn supports deadlines
// (net.Conn, or an *os.File of a non-blocking socket), to stop a blocked
// read.
func ForwardDump(ctx context.Context, conn io.ReadWriter, hdrSize int, s *Sender) (DumpStats, error) {
	var st DumpStats
	start := time.Now()
	before := s.Counters()
	if d, ok := conn.(interface{ SetDeadline(time.Time) error }); ok {
		stop := context.AfterFunc(ctx, func() { _ = d.SetDeadline(time.Unix(1, 0)) })
		defer func() {
			if stop() {
				_ = d.SetDeadline(time.Time{})
			}
		}()
	}
	dec := psproto.NewDecoder(conn, hdrSize)
	maxPages := s.maxPagesPerRecord()
	buf := make([]byte, min(maxPages, 256)*PageSize)
	maxPages = len(buf) / PageSize
	fail := func(err error) (DumpStats, error) {
		st.Bytes = dec.Offset()
		st.Counters = s.Counters().Sub(before)
		st.Duration = time.Since(start)
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return st, fmt.Errorf("forward dump: %w", err)
	}
	for {
		h, err := dec.Next()
		if err == io.EOF {
			return fail(ErrStreamEnded)
		}
		if err != nil {
			return fail(err)
		}
		st.Commands++
		switch {
		case h.Cmd == psproto.OpOpen || h.Cmd == psproto.OpOpen2:
			st.Images++
			if err := s.sendCommand(ctx, h); err != nil {
				return fail(err)
			}
			if h.Cmd == psproto.OpOpen2 {
				if err := psproto.WriteHasParent(conn, false); err != nil {
					return fail(fmt.Errorf("answer OPEN2: %w", err))
				}
			}
		case h.Cmd == psproto.OpParent:
			if err := psproto.WriteStatus(conn, 0); err != nil {
				return fail(fmt.Errorf("answer PARENT: %w", err))
			}
		case h.Cmd == psproto.OpGet:
			return fail(fmt.Errorf("%w: %v", ErrUnexpectedCommand, h))
		case h.HasData():
			st.Pages += h.NrPages
			// Split into records that fit a batch; each part becomes its own
			// command for the page server on the destination.
			part := h
			for left := h.NrPages; left > 0; {
				n := min(left, uint64(maxPages))
				if err := dec.ReadPayload(buf[:n*PageSize]); err != nil {
					return fail(err)
				}
				part.NrPages = n
				if err := s.sendPages(ctx, part, buf[:n*PageSize]); err != nil {
					return fail(err)
				}
				part.Vaddr += n * PageSize
				left -= n
			}
		case h.Cmd == psproto.OpClose || h.Cmd == psproto.OpForceClose:
			if err := s.sendCommand(ctx, h); err != nil {
				return fail(err)
			}
			if err := s.Flush(ctx, true); err != nil {
				return fail(err)
			}
			if err := psproto.WriteStatus(conn, 0); err != nil {
				return fail(fmt.Errorf("acknowledge CLOSE: %w", err))
			}
			st.Bytes = dec.Offset()
			st.Counters = s.Counters().Sub(before)
			st.Duration = time.Since(start)
			return st, nil
		default:
			if err := s.sendCommand(ctx, h); err != nil {
				return fail(err)
			}
		}
	}
}
