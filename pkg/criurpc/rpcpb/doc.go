// Package rpcpb holds the protobuf messages of CRIU's RPC protocol
// (rpc.proto) and of CRIU's statistics images (stats.proto), with the Go code
// generated from them by scripts/genproto.sh. Field numbers match CRIU 4.2;
// package criurpc is the client that uses them.
package rpcpb
