package pagexfer

import (
	"crypto/sha256"
	"encoding/hex"
)

// PageSize is the size of a memory page as CRIU transfers it.
const PageSize = 4096

// Hash identifies a page's content: SHA-256 of its 4096 bytes.
type Hash [32]byte

// String is the hash in hex.
func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// HashPage hashes one page of content.
func HashPage(p []byte) Hash { return sha256.Sum256(p) }

// zeroHash is the hash of an all-zero page.
var zeroHash = HashPage(make([]byte, PageSize))

// isZero reports whether p holds only zero bytes.
func isZero(p []byte) bool {
	for len(p) >= 8 {
		if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
