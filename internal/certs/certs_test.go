package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestParseHosts(t *testing.T) {
	hs, err := ParseHosts("hostA=10.0.0.1", "hostB=10.0.0.2,fd00::2 hostC")
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 3 || hs[0].Name != "hostA" || !hs[0].IPs[0].Equal(net.ParseIP("10.0.0.1")) || len(hs[1].IPs) != 2 || len(hs[2].IPs) != 0 {
		t.Fatalf("parsed %+v", hs)
	}
	for _, bad := range []string{"", "a=notanip", "../x=10.0.0.1", "a a", "ca", "a=10.0.0.1,", "-a"} {
		if _, err := ParseHosts(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseHosts(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	hs, _ := ParseHosts("hostA=10.0.0.1", "hostB=10.0.0.2")
	wrote, err := Init(dir, hs, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(wrote) != 6 {
		t.Fatalf("wrote %v", wrote)
	}
	for _, k := range []string{"ca.key", "hostA.key", "hostB.key"} {
		st, err := os.Stat(filepath.Join(dir, k))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s mode %v (%v), want 0600", k, st.Mode().Perm(), err)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v", st.Mode().Perm())
	}
	caPEM, _ := os.ReadFile(filepath.Join(dir, "ca.crt"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "hostB.crt"), filepath.Join(dir, "hostB.key"))
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Fatalf("hostB certificate for usage %v: %v", usage, err)
		}
	}
	if err := leaf.VerifyHostname("10.0.0.2"); err != nil {
		t.Fatalf("hostB certificate does not name its IP: %v", err)
	}
	if err := leaf.VerifyHostname("hostB"); err != nil {
		t.Fatalf("hostB certificate does not name its host: %v", err)
	}
	if err := leaf.VerifyHostname("10.0.0.1"); err == nil {
		t.Fatal("hostB certificate names hostA's IP")
	}
	if leaf.NotAfter.Before(time.Now().Add(DefaultValidity - time.Hour)) {
		t.Fatalf("validity ends %v", leaf.NotAfter)
	}

	// A second run reuses the CA and refuses to overwrite a host.
	hc, _ := ParseHosts("hostC=10.0.0.3")
	if _, err := Init(dir, hc, 0); err != nil {
		t.Fatal(err)
	}
	caPEM2, _ := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if string(caPEM) != string(caPEM2) {
		t.Fatal("the CA was replaced")
	}
	if _, err := Init(dir, hc, 0); !errors.Is(err, os.ErrExist) {
		t.Fatalf("overwriting hostC: %v", err)
	}
	ca, err := LoadCA(dir)
	if err != nil || !ca.Cert.IsCA {
		t.Fatalf("LoadCA: %v", err)
	}
}
