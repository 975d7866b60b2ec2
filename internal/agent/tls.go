package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// TLSFiles names the PEM files of an agent's TLS identity: its certificate
// and key (used both as the Peer API server and as the client that drives
// migrations to other hosts) and the certificate authority that signs every
// agent's certificate.
type TLSFiles struct {
	Cert, Key, CA string
}

// ErrTLSConfig reports unusable TLS files; the message names the file.
var ErrTLSConfig = errors.New("TLS configuration")

// ErrPeerNotAllowed: the peer's certificate is valid but names no identity
// on the allow-list.
var ErrPeerNotAllowed = errors.New("peer identity not on the allow-list")

// LoadTLS reads files and returns the configurations of the Peer API
// server and of the client. Both require TLS 1.3 and verify the other side
// against the CA: the server requires a client certificate, the client
// checks that the server's certificate names the address it dialled
// (PeerDialer sets ServerName). A non-empty allow lists the peer identities
// (certificate DNS or IP SANs) the server accepts. LoadTLS fails when the
// certificate does not match the key, is not signed by the CA, or is not
// valid now.
func LoadTLS(f TLSFiles, allow []string) (server, client *tls.Config, err error) {
	pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: certificate %s and key %s: %v", ErrTLSConfig, f.Cert, f.Key, err)
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: CA: %v", ErrTLSConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, nil, fmt.Errorf("%w: CA %s holds no PEM certificate", ErrTLSConfig, f.CA)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, nil, fmt.Errorf("%w: certificate %s: %v", ErrTLSConfig, f.Cert, err)
		}
	}
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, nil, fmt.Errorf("%w: certificate %s does not verify against CA %s for server and client use (valid %s to %s): %v",
			ErrTLSConfig, f.Cert, f.CA, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339), err)
	}
	for _, a := range allow {
		if strings.TrimSpace(a) == "" {
			return nil, nil, fmt.Errorf("%w: empty entry in the peer allow-list", ErrTLSConfig)
		}
	}
	server = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}
	if len(allow) > 0 {
		allow := append([]string(nil), allow...)
		server.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return ErrPeerNotAllowed
			}
			c := cs.PeerCertificates[0]
			if Allowed(c, allow) {
				return nil
			}
			return fmt.Errorf("%w: certificate %q names %s", ErrPeerNotAllowed, c.Subject.CommonName, strings.Join(SANs(c), ", "))
		}
	}
	client = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
	}
	return server, client, nil
}

// SANs lists a certificate's DNS and IP subject alternative names.
func SANs(c *x509.Certificate) []string {
	out := append([]string(nil), c.DNSNames...)
	for _, ip := range c.IPAddresses {
		out = append(out, ip.String())
	}
	return out
}

// Allowed reports whether one of c's DNS or IP SANs is on allow. Names
// compare case-insensitively, addresses by value (10.0.0.1 and
// ::ffff:10.0.0.1 are the same).
func Allowed(c *x509.Certificate, allow []string) bool {
	for _, a := range allow {
		if ip := net.ParseIP(a); ip != nil {
			for _, cip := range c.IPAddresses {
				if cip.Equal(ip) {
					return true
				}
			}
			continue
		}
		for _, d := range c.DNSNames {
			if strings.EqualFold(d, a) {
				return true
			}
		}
	}
	return false
}

// ServerCredentials returns the Peer API's transport credentials over
// cfg: TLS, with every refused handshake logged (remote address and why)
// and counted by refused when it is not nil.
func ServerCredentials(cfg *tls.Config, log hclog.Logger, refused func()) credentials.TransportCredentials {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &loggedCreds{TransportCredentials: credentials.NewTLS(cfg), log: log, refused: refused}
}

type loggedCreds struct {
	credentials.TransportCredentials
	log     hclog.Logger
	refused func()
}

func (c *loggedCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	out, ai, err := c.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		if errors.Is(err, io.EOF) {
			// A probe that connected and left, or a client that gave up.
			c.log.Debug("peer connection closed during the TLS handshake", "remote", conn.RemoteAddr().String())
		} else {
			c.log.Warn("peer refused: TLS handshake failed", "remote", conn.RemoteAddr().String(), "error", err)
		}
		if c.refused != nil {
			c.refused()
		}
	}
	return out, ai, err
}

func (c *loggedCreds) Clone() credentials.TransportCredentials {
	return &loggedCreds{TransportCredentials: c.TransportCredentials.Clone(), log: c.log, refused: c.refused}
}

// PeerIdentity names the caller of a gRPC call: the first SAN of its
// verified TLS certificate (its common name when it has none), or, without
// TLS, its address; "" when unknown.
func PeerIdentity(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ""
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
		c := ti.State.PeerCertificates[0]
		if s := SANs(c); len(s) > 0 {
			return s[0]
		}
		return c.Subject.CommonName
	}
	if p.Addr != nil {
		if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
			return host
		}
		return p.Addr.String()
	}
	return ""
}
