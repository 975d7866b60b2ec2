// Package agent adapts migrated's engine (pkg/phaul) to its gRPC services:
// the Control service on a unix socket, the Peer service on TCP, and the
// Peer client the source uses to drive a destination. It is the only place
// where protobuf types meet engine types, and the only place errors are
// translated to and from gRPC status codes.
package agent
