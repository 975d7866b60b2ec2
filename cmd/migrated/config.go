package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"

	"github.com/migrated/migrated/internal/config"
	"github.com/migrated/migrated/internal/failpoint"
)

// options are the daemon's settings plus what only the command line says.
type options struct {
	config.Config
	configPath string
	version    bool
	failpoints string
}

// parseFlags builds the options: defaults, the configuration file
// (--config; /etc/migrated/config when it exists), then the flags given.
func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("migrated", flag.ContinueOnError)
	fs.SetOutput(stderr)
	apply := config.Flags(fs)
	fs.StringVar(&o.configPath, "config", config.DefaultPath, "configuration file (TOML); flags override it")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.StringVar(&o.failpoints, "failpoints", os.Getenv(failpoint.EnvVar), "fault injection for tests (see package failpoint); empty in production")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if o.version {
		return o, nil
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
	c, err := config.Resolve(o.configPath, !explicit, apply)
	if err != nil {
		return o, err
	}
	o.Config = c
	return o, nil
}

// lookupGroup resolves socket_group, a group name or a numeric gid, to a
// gid; -1 when it is empty.
func lookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if gid, err := strconv.Atoi(name); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, &config.KeyError{Key: "socket_group", Flag: "socket-group", Msg: err.Error()}
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, &config.KeyError{Key: "socket_group", Flag: "socket-group", Msg: fmt.Sprintf("group %s has gid %q", name, g.Gid)}
	}
	return gid, nil
}
