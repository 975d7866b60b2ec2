package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	migratev1 "github.com/migrated/migrated/api/migrate/v1"
)

// TLSFiles names the PEM files of a remote-control client: its certificate
// and key, which the agent checks against its CA and its control.allow
// list, and the CA that signs the agent's certificate.
type TLSFiles struct {
	Cert, Key, CA string
}

// LoadTLS reads files and returns a client configuration for DialTLS: TLS
// 1.3, the certificate and key as the client's identity, the CA as the only
// root the agent's certificate may chain to. It fails, naming the file, when
// a file is missing or unreadable, the certificate does not match the key,
// or the CA file holds no certificate.
func LoadTLS(files TLSFiles) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(files.Cert, files.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate %s and key %s: %v", ErrTLSConfig, files.Cert, files.Key, err)
	}
	caPEM, err := os.ReadFile(files.CA)
	if err != nil {
		return nil, fmt.Errorf("%w: CA: %v", ErrTLSConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%w: CA %s holds no PEM certificate", ErrTLSConfig, files.CA)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
	}, nil
}

// DialTLS connects to an agent's remote Control API at addr (HOST:PORT, the
// agent's control.listen) over mutual TLS with cfg, usually from LoadTLS.
// cfg must carry a client certificate. The agent's certificate must name
// cfg.ServerName or, when that is empty, the host of addr. DialTLS does not
// modify cfg. The connection is made on the first call.
func DialTLS(addr string, cfg *tls.Config) (*Client, error) {
	host, port, err := net.SplitHostPort(addr)
	if err == nil && (host == "" || port == "") {
		err = errors.New("missing host or port")
	}
	if err != nil {
		return nil, fmt.Errorf("remote control address %q: want HOST:PORT: %w", addr, err)
	}
	if cfg == nil || len(cfg.Certificates) == 0 && cfg.GetClientCertificate == nil {
		return nil, fmt.Errorf("%w: remote control %s needs a client certificate", ErrTLSConfig, addr)
	}
	cfg = cfg.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	conn, err := grpc.NewClient("dns:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return nil, fmt.Errorf("remote control %s: %w", addr, err)
	}
	return &Client{conn: conn, c: migratev1.NewControlClient(conn)}, nil
}
