package scope

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/migrated/migrated/test/e2e"
)

// WaitForBed returns once no test bed holds e2e.LockFile, or with ctx's
// error when ctx ends first, telling w that it waits. e2e.NewHosts waits for
// the lock too, but cannot be interrupted; calling WaitForBed first keeps a
// program responsive to Ctrl-C while another bed (an e2e test) runs. It
// needs write access to the lock file's directory (root).
func WaitForBed(ctx context.Context, w io.Writer) error {
	f, err := os.OpenFile(e2e.LockFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	told := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			return fmt.Errorf("lock %s: %w", e2e.LockFile, err)
		}
		if !told {
			fmt.Fprintf(w, "waiting for another test bed (an e2e test run?) to finish: %s is locked\n", e2e.LockFile)
			told = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
