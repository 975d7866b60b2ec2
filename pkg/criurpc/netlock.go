package criurpc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/protowire"
)

// A dump with TCPEstablished and NetworkLockNFTables blocks the tree's
// connections with an nftables table of its own, "inet CRIU-<run id>",
// named after the dump's run id (which CRIU records in inventory.img). A
// dump that fails removes it; a successful dump that leaves the tree
// stopped (LeaveStopped) keeps it, since the connections must stay silent
// until the tree runs somewhere. A caller that resumes such a tree on this
// host (an aborted migration), or removes it (a committed one), removes
// the table with UnlockNetwork.

// ErrBadInventory is the error of an inventory image that cannot be read.
var ErrBadInventory = errors.New("malformed inventory image")

const (
	inventoryMagic = 0x58313116
	// inventoryRunIDField is dump_criu_run_id in CRIU's InventoryEntry.
	inventoryRunIDField = 13
	// maxInventory bounds the inventory image read from a dump.
	maxInventory = 1 << 20
)

// DumpRunID returns the run id of the dump in imagesDir, from its
// inventory image.
func DumpRunID(imagesDir string) (string, error) {
	b, err := readLimited(filepath.Join(imagesDir, "inventory.img"), maxInventory+1)
	if err != nil {
		return "", err
	}
	if len(b) > maxInventory {
		return "", fmt.Errorf("%w: more than %d bytes", ErrBadInventory, maxInventory)
	}
	return parseInventoryRunID(b)
}

// parseInventoryRunID reads an inventory image: the inventory magic (u32,
// host byte order, no service magic before it), a u32 size and that many
// bytes of InventoryEntry, whose field 13 is the run id.
func parseInventoryRunID(b []byte) (string, error) {
	if len(b) < 8 {
		return "", fmt.Errorf("%w: %d bytes", ErrBadInventory, len(b))
	}
	if m := binary.NativeEndian.Uint32(b); m != inventoryMagic {
		return "", fmt.Errorf("%w: magic %#x", ErrBadInventory, m)
	}
	n := binary.NativeEndian.Uint32(b[4:])
	if uint64(n) > uint64(len(b)-8) {
		return "", fmt.Errorf("%w: entry of %d bytes with %d present", ErrBadInventory, n, len(b)-8)
	}
	msg := b[8 : 8+n]
	for len(msg) > 0 {
		num, typ, l := protowire.ConsumeTag(msg)
		if l < 0 {
			return "", fmt.Errorf("%w: %v", ErrBadInventory, protowire.ParseError(l))
		}
		msg = msg[l:]
		if num == inventoryRunIDField && typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(msg)
			if l < 0 {
				return "", fmt.Errorf("%w: run id: %v", ErrBadInventory, protowire.ParseError(l))
			}
			id := string(v)
			if id == "" || strings.ContainsFunc(id, func(r rune) bool {
				return !(r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
			}) {
				return "", fmt.Errorf("%w: run id %q", ErrBadInventory, id)
			}
			return id, nil
		}
		l = protowire.ConsumeFieldValue(num, typ, msg)
		if l < 0 {
			return "", fmt.Errorf("%w: field %d: %v", ErrBadInventory, num, protowire.ParseError(l))
		}
		msg = msg[l:]
	}
	return "", fmt.Errorf("%w: no run id (CRIU before 4.0?)", ErrBadInventory)
}

// NetworkLockTable is the name of the nftables table (family inet) that a
// dump with the given run id locks the network with. CRIU formats
// "inet CRIU-<run id>" into 32 bytes, so the name is cut at 26 characters.
func NetworkLockTable(runID string) string {
	t := "CRIU-" + runID
	if len(t) > 26 {
		t = t[:26]
	}
	return t
}

// UnlockNetwork removes the nftables table of the dump with the given run
// id, in the caller's network namespace, with the nft command. A table
// that does not exist is not an error.
func UnlockNetwork(ctx context.Context, runID string) error {
	table := NetworkLockTable(runID)
	out, err := exec.CommandContext(ctx, "nft", "delete", "table", "inet", table).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "No such file or directory") {
			return nil
		}
		return fmt.Errorf("removing the network lock (nft table inet %s): %v: %s", table, err, msg)
	}
	return nil
}
