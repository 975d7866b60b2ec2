package criurpc

import (
	"fmt"
)

// Version is CRIU's version as reported over RPC.
type Version struct {
	Major, Minor, Sublevel int
	// Extra is the fourth version number of some builds, 0 when absent.
	Extra int
	// GitID is the git revision of development builds, "" for releases.
	GitID string
	// Name is the release name when CRIU reports one.
	Name string
}

// String formats the version like `criu --version`: "4.2.1", "4.2" when
// there is no sublevel, with ".Extra" and "-GitID" appended when present.
func (v Version) String() string {
	s := fmt.Sprintf("%d.%d", v.Major, v.Minor)
	if v.Sublevel != 0 || v.Extra != 0 {
		s += fmt.Sprintf(".%d", v.Sublevel)
	}
	if v.Extra != 0 {
		s += fmt.Sprintf(".%d", v.Extra)
	}
	if v.GitID != "" {
		s += "-" + v.GitID
	}
	return s
}

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	if v.Major != major {
		return v.Major > major
	}
	return v.Minor >= minor
}

// PageServerHeaderSize is the size in bytes of the page-server protocol's
// per-command header spoken by this CRIU version: 24 up to 4.1.x (u32
// nr_pages) and 32 from 4.2 (u64 nr_pages plus padding). The protocol has no
// version handshake, so both ends of a page stream must agree on it.
func (v Version) PageServerHeaderSize() int {
	if v.AtLeast(4, 2) {
		return 32
	}
	return 24
}

// Features are the answers to CRIU's FEATURE_CHECK request, as computed by
// CRIU on this kernel.
type Features struct {
	// MemTrack: the kernel tracks soft-dirty pages, so pre-dump and
	// dumps with TrackMem work.
	MemTrack bool
	// LazyPages: userfaultfd with non-cooperative events works, so
	// restores with lazy pages (post-copy) work.
	LazyPages bool
	// PidfdStore: pidfd_open and pidfd_getfd exist, so CRIU can keep
	// pidfds between pre-dumps to detect PID reuse.
	PidfdStore bool
}

// Capabilities is what a host's CRIU can do, as one value that two hosts'
// reports can be compared with.
type Capabilities struct {
	Version Version
	// PageServerHeaderSize is Version.PageServerHeaderSize().
	PageServerHeaderSize int
	Features             Features
	// SoftDirty reports that memory changes can be tracked by the kernel
	// (Features.MemTrack); without it, pre-copy must compare page
	// contents instead of using CRIU pre-dumps.
	SoftDirty bool
}

// Compatible reports whether images and page streams made by a CRIU with
// capabilities c can be restored by one with capabilities dst, and if not,
// why: the page-server header sizes must match and the destination must be
// at least as new as the source.
func (c Capabilities) Compatible(dst Capabilities) error {
	if c.PageServerHeaderSize != dst.PageServerHeaderSize {
		return fmt.Errorf("page-server header size differs: criu %s uses %d bytes, criu %s uses %d",
			c.Version, c.PageServerHeaderSize, dst.Version, dst.PageServerHeaderSize)
	}
	if !dst.Version.AtLeast(c.Version.Major, c.Version.Minor) {
		return fmt.Errorf("destination criu %s is older than source criu %s", dst.Version, c.Version)
	}
	return nil
}
