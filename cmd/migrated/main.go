// Command migrated is the migration agent: one runs on every host, serving
// the Control API on a unix socket (for migratectl and orchestrators) and
// the Peer API on TCP (for other agents).
package main

import (
	"context"
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
		fmt.Fprintf(os.Stderr, "migrated: %v\n", err)
		os.Exit(1)
	}
}
