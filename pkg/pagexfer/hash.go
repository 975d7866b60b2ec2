package pagexfer

import (
	"crypto/sha256"
	"encoding/hex"
	"runtime"
	"sync"
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

// parallelHashMin is the number of pages from which hashPages spreads the
// work over the CPUs.
const parallelHashMin = 64

// hashPages hashes every page of pages into hs (len(pages)/PageSize
// entries), marking all-zero pages in zero. Large runs are split over up to
// GOMAXPROCS goroutines, all finished when it returns: during a final dump
// hashing is the source's main cost while the process is frozen.
func hashPages(pages []byte, hs []Hash, zero []bool) {
	n := len(pages) / PageSize
	one := func(lo, hi int) {
		for i := lo; i < hi; i++ {
			p := pages[i*PageSize : (i+1)*PageSize]
			if zero[i] = isZero(p); !zero[i] {
				hs[i] = HashPage(p)
			}
		}
	}
	workers := min(runtime.GOMAXPROCS(0), 4, n/(parallelHashMin/2))
	if n < parallelHashMin || workers < 2 {
		one(0, n)
		return
	}
	var wg sync.WaitGroup
	per := (n + workers - 1) / workers
	for lo := per; lo < n; lo += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			one(lo, hi)
		}(lo, min(lo+per, n))
	}
	one(0, min(per, n))
	wg.Wait()
}
