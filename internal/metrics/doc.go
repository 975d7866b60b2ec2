// Package metrics exports migrated's Prometheus metrics: migrations by
// result, phase durations, downtime, bytes moved (raw and on the wire),
// pre-copy rounds, dirty rates, migrations in flight, and refusals at the
// two doors (Peer API TLS handshakes, Control API permission checks).
//
// Migration metrics are derived from the source engine's event stream
// (phaul.SourceConfig.Observe): a migration is in flight from its first
// event to the event that carries its outcome, and a phase lasts from its
// first event to the first event of the next phase. The metrics live in
// their own registry, served by Handler; nothing is registered globally.
package metrics
