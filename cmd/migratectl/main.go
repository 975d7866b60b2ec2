// Command migratectl drives a migrated agent: move a process to another
// host, check whether it can move, list, watch and cancel migrations. It
// talks to the agent on this host over its control socket, or to a remote
// agent's control.listen port over mutual TLS (--addr with --tls-cert,
// --tls-key and --tls-ca).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(int(ee))
		}
		fmt.Fprintf(os.Stderr, "migratectl: %v\n", err)
		os.Exit(1)
	}
}

// exitError ends the program with a status after the error was printed.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
