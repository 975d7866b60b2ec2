// Package criurpc is a Go client for CRIU's RPC interface ("swrk" mode).
package criurpc
