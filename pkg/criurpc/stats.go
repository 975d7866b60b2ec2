package criurpc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/migrated/migrated/pkg/criurpc/rpcpb"
)

// ErrBadStatsImage means a stats image is not in CRIU's format.
var ErrBadStatsImage = errors.New("malformed criu stats image")

const (
	// imgServiceMagic heads CRIU's service images (stats, irmap cache).
	imgServiceMagic = 0x55105940
	// statsMagic identifies a stats image.
	statsMagic = 0x57093306
	// maxStatsEntry bounds the protobuf payload of a stats image.
	maxStatsEntry = 1 << 16
)

// DumpStats are CRIU's statistics of a dump or pre-dump (stats-dump). After
// a lazy dump (DumpOptions.LazyPages) the page counters read 0: CRIU 4.2's
// lazy page server resets them before the file is written.
type DumpStats struct {
	// FreezingTime is how long freezing the tree took.
	FreezingTime time.Duration
	// FrozenTime is how long the tree stayed frozen.
	FrozenTime time.Duration
	// MemDumpTime is the time spent draining memory out of the tree,
	// MemWriteTime the time spent writing it out (to files or the page
	// server).
	MemDumpTime  time.Duration
	MemWriteTime time.Duration
	// IrmapResolveTime is the time spent resolving inotify paths.
	IrmapResolveTime time.Duration
	// PagesScanned counts pages of private memory CRIU looked at;
	// PagesSkippedParent those unchanged since the parent dump;
	// PagesWritten those written (or sent); PagesLazy those left for
	// lazy restore.
	PagesScanned       uint64
	PagesSkippedParent uint64
	PagesWritten       uint64
	PagesLazy          uint64
	// PagePipes and PagePipeBufs count the pipes used to drain memory.
	PagePipes    uint64
	PagePipeBufs uint64
	// The same counters for shared memory.
	ShPagesScanned       uint64
	ShPagesSkippedParent uint64
	ShPagesWritten       uint64
}

// RestoreStats are CRIU's statistics of a restore (stats-restore).
type RestoreStats struct {
	// PagesCompared and PagesSkippedCOW count pages compared with (and
	// shared with) the parent's copy-on-write pages; PagesRestored those
	// restored.
	PagesCompared   uint64
	PagesSkippedCOW uint64
	PagesRestored   uint64
	// ForkingTime is how long creating the tasks took, RestoreTime the
	// whole restore.
	ForkingTime time.Duration
	RestoreTime time.Duration
}

func usec(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }

// decodeStatsImage decodes a stats image: the service magic, the stats
// magic (both u32, host byte order), a u32 size and that many bytes of
// protobuf stats_entry. Nothing may follow.
func decodeStatsImage(b []byte) (*rpcpb.StatsEntry, error) {
	if len(b) < 12 {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadStatsImage, len(b))
	}
	if m := binary.NativeEndian.Uint32(b); m != imgServiceMagic {
		return nil, fmt.Errorf("%w: head magic %#x", ErrBadStatsImage, m)
	}
	if m := binary.NativeEndian.Uint32(b[4:]); m != statsMagic {
		return nil, fmt.Errorf("%w: magic %#x", ErrBadStatsImage, m)
	}
	size := binary.NativeEndian.Uint32(b[8:])
	if size > maxStatsEntry || uint64(size) != uint64(len(b)-12) {
		return nil, fmt.Errorf("%w: entry of %d bytes in %d", ErrBadStatsImage, size, len(b)-12)
	}
	e := new(rpcpb.StatsEntry)
	if err := proto.Unmarshal(b[12:], e); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadStatsImage, err)
	}
	return e, nil
}

// ParseDumpStats decodes the contents of a stats-dump image.
func ParseDumpStats(b []byte) (*DumpStats, error) {
	e, err := decodeStatsImage(b)
	if err != nil {
		return nil, err
	}
	d := e.GetDump()
	if d == nil {
		return nil, fmt.Errorf("%w: no dump statistics", ErrBadStatsImage)
	}
	return &DumpStats{
		FreezingTime:         usec(d.GetFreezingTime()),
		FrozenTime:           usec(d.GetFrozenTime()),
		MemDumpTime:          usec(d.GetMemdumpTime()),
		MemWriteTime:         usec(d.GetMemwriteTime()),
		IrmapResolveTime:     usec(d.GetIrmapResolve()),
		PagesScanned:         d.GetPagesScanned(),
		PagesSkippedParent:   d.GetPagesSkippedParent(),
		PagesWritten:         d.GetPagesWritten(),
		PagesLazy:            d.GetPagesLazy(),
		PagePipes:            d.GetPagePipes(),
		PagePipeBufs:         d.GetPagePipeBufs(),
		ShPagesScanned:       d.GetShpagesScanned(),
		ShPagesSkippedParent: d.GetShpagesSkippedParent(),
		ShPagesWritten:       d.GetShpagesWritten(),
	}, nil
}

// ParseRestoreStats decodes the contents of a stats-restore image.
func ParseRestoreStats(b []byte) (*RestoreStats, error) {
	e, err := decodeStatsImage(b)
	if err != nil {
		return nil, err
	}
	r := e.GetRestore()
	if r == nil {
		return nil, fmt.Errorf("%w: no restore statistics", ErrBadStatsImage)
	}
	return &RestoreStats{
		PagesCompared:   r.GetPagesCompared(),
		PagesSkippedCOW: r.GetPagesSkippedCow(),
		PagesRestored:   r.GetPagesRestored(),
		ForkingTime:     usec(r.GetForkingTime()),
		RestoreTime:     usec(r.GetRestoreTime()),
	}, nil
}

func readStatsFile(path string) ([]byte, error) {
	return readLimited(path, 12+maxStatsEntry+1)
}

// readLimited reads at most limit bytes of a file CRIU wrote: a file
// longer than its format allows is cut there, and its parser refuses it.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// ReadDumpStats reads stats-dump from a dump's work directory.
func ReadDumpStats(workDir string) (*DumpStats, error) {
	b, err := readStatsFile(filepath.Join(workDir, "stats-dump"))
	if err != nil {
		return nil, err
	}
	return ParseDumpStats(b)
}

// ReadRestoreStats reads stats-restore from a restore's work directory.
func ReadRestoreStats(workDir string) (*RestoreStats, error) {
	b, err := readStatsFile(filepath.Join(workDir, "stats-restore"))
	if err != nil {
		return nil, err
	}
	return ParseRestoreStats(b)
}
