package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/migrated/migrated/internal/certs"
)

const certsUsage = `usage: migratectl certs init DIR --host NAME[=IP[,IP...]] [--host ...] [--days N]

Creates DIR (0700) with a certificate authority (ca.crt, ca.key) unless DIR
already holds one, and for each host NAME.crt and NAME.key: an ECDSA P-256
key and a certificate for server and client use whose SANs are NAME and the
given IPs. Give every host the address its peers dial. Copy ca.crt,
NAME.crt and NAME.key to each host (e.g. /etc/migrated/tls/) and keep
ca.key offline.
`

// hostFlags collects repeated --host values.
type hostFlags []string

func (h *hostFlags) String() string     { return strings.Join(*h, " ") }
func (h *hostFlags) Set(v string) error { *h = append(*h, v); return nil }

// cmdCerts runs `migratectl certs`; it needs no agent.
func cmdCerts(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "init" {
		fmt.Fprint(stderr, certsUsage)
		return errors.New("certs: the only subcommand is init")
	}
	fs := flag.NewFlagSet("certs init", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, certsUsage) }
	var hosts hostFlags
	fs.Var(&hosts, "host", "NAME=IP[,IP...]; repeatable")
	days := fs.Int("days", int(certs.DefaultValidity/(24*time.Hour)), "validity in days")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		fmt.Fprint(stderr, certsUsage)
		return errors.New("certs init needs exactly one DIR")
	}
	if *days <= 0 {
		return fmt.Errorf("--days %d: must be positive", *days)
	}
	hs, err := certs.ParseHosts(hosts...)
	if err != nil {
		return err
	}
	wrote, err := certs.Init(pos[0], hs, time.Duration(*days)*24*time.Hour)
	for _, p := range wrote {
		fmt.Fprintf(stdout, "wrote %s\n", p)
	}
	return err
}
