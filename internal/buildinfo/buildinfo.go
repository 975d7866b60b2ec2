// Package buildinfo holds the version stamped into migrated's binaries at
// build time (make build sets Version with -ldflags).
package buildinfo

import "runtime/debug"

// Version is the release or git description of this build.
var Version = "dev"

// String returns Version, falling back to the module version recorded by
// the Go toolchain when the binary was built without make.
func String() string {
	if Version != "dev" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return Version
}
