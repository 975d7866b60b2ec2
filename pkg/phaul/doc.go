// Package phaul is migrated's migration engine: the state machine that
// moves a running process tree from a source host to a destination host.
//
// It knows nothing of gRPC or the wire format: it drives small interfaces
// (a peer, a CRIU client, a page channel) that cmd/migrated wires to the
// real implementations and tests wire to fakes.
package phaul
