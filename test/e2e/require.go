package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"testing"
)

// MinCRIU is the oldest CRIU release the tests accept. Older releases do not
// start on the kernels these tests run on (3.17) or cannot dump inet sockets
// (4.1.1).
var MinCRIU = [2]int{4, 2}

// inCI reports whether the tests run in CI, where a missing prerequisite is a
// failure instead of a reason to skip.
func inCI() bool { return os.Getenv("CI") == "true" }

// missing fails the test in CI and skips it elsewhere, with a one-line reason.
func missing(t testing.TB, reason string) {
	t.Helper()
	if inCI() {
		t.Fatalf("CI=true but %s", reason)
		return
	}
	t.Skip(reason)
}

// RequireRoot fails the test when CI=true and the process is not root, and
// skips it with a one-line reason otherwise. The test bed needs root to create
// namespaces, veths and to run CRIU.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "test needs root (namespaces, veths, CRIU); run as root")
	}
}

var criuCheck struct {
	once sync.Once
	path string
	err  error
}

var criuVersionRE = regexp.MustCompile(`(?m)^Version:\s*(\d+)\.(\d+)`)

// RequireCRIU calls RequireRoot and then checks that a criu binary of at
// least version MinCRIU is on PATH; it returns the binary's path. Like
// RequireRoot it fails the test when CI=true and skips it otherwise.
func RequireCRIU(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	criuCheck.once.Do(func() {
		p, err := exec.LookPath("criu")
		if err != nil {
			criuCheck.err = fmt.Errorf("criu not found on PATH (make setup installs it)")
			return
		}
		out, err := exec.Command(p, "--version").CombinedOutput()
		if err != nil {
			criuCheck.err = fmt.Errorf("%s --version failed: %v: %s", p, err, bytes.TrimSpace(out))
			return
		}
		m := criuVersionRE.FindSubmatch(out)
		if m == nil {
			criuCheck.err = fmt.Errorf("cannot parse %s --version output %q", p, bytes.TrimSpace(out))
			return
		}
		major, _ := strconv.Atoi(string(m[1]))
		minor, _ := strconv.Atoi(string(m[2]))
		if major < MinCRIU[0] || major == MinCRIU[0] && minor < MinCRIU[1] {
			criuCheck.err = fmt.Errorf("criu %d.%d at %s is older than %d.%d (make setup installs a newer one)",
				major, minor, p, MinCRIU[0], MinCRIU[1])
			return
		}
		criuCheck.path = p
	})
	if criuCheck.err != nil {
		missing(t, criuCheck.err.Error())
	}
	return criuCheck.path
}

// RequireNFT calls RequireRoot and checks that the nft command (Debian's
// nftables, which make setup installs) is on PATH; like RequireRoot it
// fails the test when CI=true and skips it otherwise.
func RequireNFT(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		missing(t, "nft not found on PATH (make setup installs nftables)")
	}
}
