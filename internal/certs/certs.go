package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// DefaultValidity is how long Init's certificates are valid.
const DefaultValidity = 2 * 365 * 24 * time.Hour

// File names of the authority in an Init directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Host names a host certificate and lists its subject alternative names.
type Host struct {
	// Name is the certificate's common name, a DNS SAN and the base of
	// its file names.
	Name string
	// IPs are the host's addresses, as IP SANs.
	IPs []net.IP
	// DNS are further DNS SANs.
	DNS []string
}

var hostName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$`)

// ParseHosts parses "NAME=IP[,IP...]" or "NAME" specifications, one per
// element or separated by spaces; an IP-less host gets only its name as a
// SAN. Example: ParseHosts("hostA=10.0.0.1", "hostB=10.0.0.2,fd00::2").
func ParseHosts(specs ...string) ([]Host, error) {
	var hosts []Host
	seen := map[string]bool{}
	for _, spec := range specs {
		for _, s := range strings.Fields(spec) {
			name, addrs, _ := strings.Cut(s, "=")
			if !hostName.MatchString(name) {
				return nil, fmt.Errorf("%w: host name %q", ErrInvalid, name)
			}
			if seen[name] || name == "ca" {
				return nil, fmt.Errorf("%w: host name %q used twice or reserved", ErrInvalid, name)
			}
			seen[name] = true
			h := Host{Name: name}
			if addrs != "" {
				for _, a := range strings.Split(addrs, ",") {
					ip := net.ParseIP(a)
					if ip == nil {
						return nil, fmt.Errorf("%w: host %s: %q is not an IP address", ErrInvalid, name, a)
					}
					h.IPs = append(h.IPs, ip)
				}
			}
			hosts = append(hosts, h)
		}
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("%w: no hosts", ErrInvalid)
	}
	return hosts, nil
}

// CA is a certificate authority that can issue host certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA creates a self-signed authority named name, valid from notBefore
// to notAfter.
func NewCA(name string, notBefore, notAfter time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"migrated"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Issue returns a certificate for h signed by the authority, valid from
// notBefore to notAfter, and its key, both PEM-encoded.
func (ca *CA) Issue(h Host, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: h.Name, Organization: []string{"migrated"}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     append([]string{h.Name}, h.DNS...),
		IPAddresses:  h.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pemBlock("CERTIFICATE", der), pemBlock("PRIVATE KEY", keyDER), nil
}

// CertPEM returns the authority's certificate, PEM-encoded.
func (ca *CA) CertPEM() []byte { return pemBlock("CERTIFICATE", ca.Cert.Raw) }

// KeyPEM returns the authority's key, PEM-encoded.
func (ca *CA) KeyPEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, err
	}
	return pemBlock("PRIVATE KEY", der), nil
}

// LoadCA reads an authority written by Init (ca.crt and ca.key in dir).
func LoadCA(dir string) (*CA, error) {
	cb, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, err
	}
	kb, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, err
	}
	cblk, _ := pem.Decode(cb)
	if cblk == nil || cblk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: %s holds no PEM certificate", ErrInvalid, filepath.Join(dir, CACertFile))
	}
	cert, err := x509.ParseCertificate(cblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, CACertFile), err)
	}
	kblk, _ := pem.Decode(kb)
	if kblk == nil || kblk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: %s holds no PEM private key", ErrInvalid, filepath.Join(dir, CAKeyFile))
	}
	k, err := x509.ParsePKCS8PrivateKey(kblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, CAKeyFile), err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: %s is not an ECDSA key", ErrInvalid, filepath.Join(dir, CAKeyFile))
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: %s is not a CA certificate", ErrInvalid, filepath.Join(dir, CACertFile))
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Init creates dir (0700) with an authority, unless dir already holds one
// (then it is reused), and a certificate for each host, refusing to
// overwrite an existing host file. It returns the paths it wrote.
func Init(dir string, hosts []Host, validity time.Duration) ([]string, error) {
	if validity <= 0 {
		validity = DefaultValidity
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	now := time.Now().Add(-5 * time.Minute) // tolerate clocks a little behind
	var wrote []string
	ca, err := LoadCA(dir)
	if os.IsNotExist(err) {
		if ca, err = NewCA("migrated CA", now, now.Add(validity)); err != nil {
			return nil, err
		}
		kp, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		if err := writeNew(filepath.Join(dir, CAKeyFile), kp, 0o600); err != nil {
			return nil, err
		}
		if err := writeNew(filepath.Join(dir, CACertFile), ca.CertPEM(), 0o644); err != nil {
			return nil, err
		}
		wrote = append(wrote, filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
	} else if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		cp, kp, err := ca.Issue(h, now, now.Add(validity))
		if err != nil {
			return wrote, fmt.Errorf("host %s: %w", h.Name, err)
		}
		certPath, keyPath := filepath.Join(dir, h.Name+".crt"), filepath.Join(dir, h.Name+".key")
		if err := writeNew(keyPath, kp, 0o600); err != nil {
			return wrote, err
		}
		if err := writeNew(certPath, cp, 0o644); err != nil {
			return wrote, err
		}
		wrote = append(wrote, certPath, keyPath)
	}
	return wrote, nil
}

// writeNew writes a file that must not exist yet.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func serialNumber() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}
