// Package client is a small Go client for migrated's Control API, for
// orchestrators and for migratectl.
//
// An agent serves the Control API on a unix socket (DefaultSocket), where
// it checks the caller's kernel credentials, and, when its configuration
// sets control.listen, on a TCP port with mutual TLS, open only to the
// client certificates whose identities (DNS or IP SANs) are on its
// control.allow list. Dial reaches the socket:
//
//	c, err := client.Dial(client.DefaultSocket)
//
// DialTLS reaches the TCP port. The client presents its certificate and
// checks that the agent's certificate is signed by the CA and names the
// host it dialled; LoadTLS builds that configuration from PEM files, for
// example ones made by `migratectl certs init`:
//
//	cfg, err := client.LoadTLS(client.TLSFiles{
//		Cert: "/etc/orch/tls/orch.crt",
//		Key:  "/etc/orch/tls/orch.key",
//		CA:   "/etc/orch/tls/ca.crt",
//	})
//	if err != nil {
//		return err
//	}
//	c, err := client.DialTLS("host2:7447", cfg)
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	list, err := c.List(ctx)
//
// Both connect on the first call, so a wrong address, a refused handshake
// or a certificate the agent does not allow shows as that call's error: a
// gRPC status with code Unavailable for the connection and handshake,
// PermissionDenied for a caller the agent does not allow.
package client
