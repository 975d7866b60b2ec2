// Package certs creates the certificates of a small private PKI for
// migrated's mutual TLS: one certificate authority and, per host, a key and
// a certificate that the host's agent uses both as a server (Peer API) and
// as a client (when it drives a migration to another host).
//
// Keys are ECDSA P-256. Host certificates carry the host name as a DNS SAN
// and the host's addresses as IP SANs, with both server and client
// authentication in their extended key usage, because an agent dials the
// address of its peer and the peer's certificate must name that address.
// Files are PEM: ca.crt and ca.key for the authority, NAME.crt and NAME.key
// for a host. Keys are written 0600.
//
// It is meant for a quick start and for tests; an operator with a PKI of
// their own issues the same shape of certificates there.
package certs
