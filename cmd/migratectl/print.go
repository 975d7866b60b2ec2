package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
)

func phaseName(p migratev1.Phase) string {
	return strings.ToLower(strings.TrimPrefix(p.String(), "PHASE_"))
}

// eventJSON is the --json form of an event: one object per line. The last
// has phase "done" or "failed" and the summary fields.
type eventJSON struct {
	MigrationID       string  `json:"migration_id"`
	Phase             string  `json:"phase"`
	Message           string  `json:"message,omitempty"`
	ElapsedMs         int64   `json:"elapsed_ms"`
	Round             uint32  `json:"round,omitempty"`
	PagesScanned      uint64  `json:"pages_scanned,omitempty"`
	PagesSent         uint64  `json:"pages_sent,omitempty"`
	PagesReferenced   uint64  `json:"pages_referenced,omitempty"`
	RawBytes          uint64  `json:"raw_bytes,omitempty"`
	WireBytes         uint64  `json:"wire_bytes"`
	RateBytesPerSec   float64 `json:"rate_bytes_per_sec,omitempty"`
	DirtyBytesPerSec  float64 `json:"dirty_bytes_per_sec,omitempty"`
	EstimatedDowntime int64   `json:"estimated_downtime_ms,omitempty"`
	// Summary, on the last event.
	DowntimeMs        *int64  `json:"downtime_ms,omitempty"`
	TotalMs           *int64  `json:"total_ms,omitempty"`
	Rounds            *uint32 `json:"rounds,omitempty"`
	DestPID           *int32  `json:"dest_pid,omitempty"`
	Error             string  `json:"error,omitempty"`
	FailedPhase       string  `json:"failed_phase,omitempty"`
	ProcessLocation   string  `json:"process_location,omitempty"`
	Advice            string  `json:"advice,omitempty"`
	PrecopyStopReason string  `json:"precopy_stop_reason,omitempty"`
}

func toJSON(e *migratev1.MoveEvent) eventJSON {
	j := eventJSON{
		MigrationID: e.MigrationId, Phase: phaseName(e.Phase), Message: e.Message, ElapsedMs: e.ElapsedMs,
		Round: e.Round, PagesScanned: e.PagesScanned, PagesSent: e.PagesSent, PagesReferenced: e.PagesReferenced,
		RawBytes: e.RawBytes, WireBytes: e.WireBytes, RateBytesPerSec: e.RateBytesPerSec,
		DirtyBytesPerSec: e.DirtyBytesPerSec, EstimatedDowntime: e.EstimatedDowntimeMs,
	}
	if o := e.Outcome; o != nil {
		j.DowntimeMs, j.TotalMs, j.Rounds, j.DestPID = &o.DowntimeMs, &o.TotalMs, &o.Rounds, &o.DestPid
		j.WireBytes = o.WireBytes
		j.Error, j.FailedPhase, j.ProcessLocation, j.Advice = o.Error, o.FailedPhase, o.ProcessLocation, o.Advice
		j.PrecopyStopReason = o.PrecopyStopReason
	}
	return j
}

func migrationJSON(m *migratev1.Migration) map[string]any {
	out := map[string]any{
		"migration_id": m.MigrationId, "role": m.Role, "pid": m.Pid, "peer": m.Peer,
		"phase": phaseName(m.Phase), "state": m.State, "started_unix_ms": m.StartedUnixMs,
	}
	if o := m.Outcome; o != nil {
		out["dest_pid"] = o.DestPid
		out["error"] = o.Error
		out["process_location"] = o.ProcessLocation
	}
	return out
}

// printer shows events: JSON lines, a live status line on a terminal, or
// plain lines otherwise.
type printer struct {
	w      io.Writer
	json   bool
	tty    bool
	live   bool // a status line is on screen without a newline
	lastPh migratev1.Phase
}

func newPrinter(w io.Writer, asJSON bool) *printer {
	return &printer{w: w, json: asJSON, tty: !asJSON && isTerminal(w)}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func (p *printer) event(e *migratev1.MoveEvent) {
	if p.json {
		b, _ := json.Marshal(toJSON(e))
		fmt.Fprintf(p.w, "%s\n", b)
		return
	}
	if e.Outcome != nil {
		p.flush()
		p.summary(e)
		return
	}
	line := fmt.Sprintf("[%6.1fs] %-8s %s", float64(e.ElapsedMs)/1000, phaseName(e.Phase), e.Message)
	if e.Phase == migratev1.Phase_PHASE_PRECOPY && e.Round > 0 {
		line = fmt.Sprintf("[%6.1fs] precopy  round %d: %.1f MiB sent, %.0f MiB/s, dirty %.1f MiB/s, est. downtime %s",
			float64(e.ElapsedMs)/1000, e.Round, mib(e.WireBytes), e.RateBytesPerSec/(1<<20), e.DirtyBytesPerSec/(1<<20),
			time.Duration(e.EstimatedDowntimeMs)*time.Millisecond)
		if p.tty {
			p.status(line)
			p.lastPh = e.Phase
			return
		}
		fmt.Fprintln(p.w, line)
		fmt.Fprintf(p.w, "           %s\n", e.Message)
		return
	}
	p.flush()
	fmt.Fprintln(p.w, line)
	p.lastPh = e.Phase
}

func (p *printer) status(line string) {
	fmt.Fprintf(p.w, "\r\x1b[K%s", line)
	p.live = true
}

func (p *printer) flush() {
	if p.live {
		fmt.Fprintln(p.w)
		p.live = false
	}
}

func (p *printer) summary(e *migratev1.MoveEvent) {
	o := e.Outcome
	if !o.Moved {
		fmt.Fprintf(p.w, "FAILED after %s: %s\n", time.Duration(o.TotalMs)*time.Millisecond, o.Error)
		return
	}
	fmt.Fprintf(p.w, "moved: pid %d now runs on the destination — %d pre-copy round(s), %.1f MiB on the wire (%.1f MiB of page data), total %s, downtime %s\n",
		o.DestPid, o.Rounds, mib(o.WireBytes), mib(o.RawBytes),
		(time.Duration(o.TotalMs) * time.Millisecond).Round(time.Millisecond), (time.Duration(o.DowntimeMs) * time.Millisecond).Round(time.Millisecond))
	if o.PrecopyStopReason != "" {
		fmt.Fprintf(p.w, "pre-copy stopped: %s\n", o.PrecopyStopReason)
	}
}
