package pagexfer

import (
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/zeebo/blake3"
)

// BenchmarkHashPage compares the two candidate page hashes on 4 KiB pages,
// one page per call as the sender hashes them.
func BenchmarkHashPage(b *testing.B) {
	page := make([]byte, PageSize)
	if _, err := rand.Read(page); err != nil {
		b.Fatal(err)
	}
	b.Run("blake3", func(b *testing.B) {
		b.SetBytes(PageSize)
		for b.Loop() {
			_ = blake3.Sum256(page)
		}
	})
	b.Run("sha256", func(b *testing.B) {
		b.SetBytes(PageSize)
		for b.Loop() {
			_ = sha256.Sum256(page)
		}
	})
	b.Run("chosen", func(b *testing.B) {
		b.SetBytes(PageSize)
		for b.Loop() {
			_ = HashPage(page)
		}
	})
}

func TestHashPagesMatchesHashPage(t *testing.T) {
	for _, n := range []int{1, 63, 64, 65, 256, 1000} {
		pages := make([]byte, n*PageSize)
		for i := range pages {
			if (i/PageSize)%3 != 0 {
				pages[i] = byte(i*7 + i/PageSize)
			}
		}
		hs := make([]Hash, n)
		zs := make([]bool, n)
		hashPages(pages, hs, zs)
		for i := 0; i < n; i++ {
			p := pages[i*PageSize : (i+1)*PageSize]
			if zs[i] != isZero(p) {
				t.Fatalf("n=%d page %d: zero=%v", n, i, zs[i])
			}
			if !zs[i] && hs[i] != HashPage(p) {
				t.Fatalf("n=%d page %d: hash differs", n, i)
			}
		}
	}
}

func BenchmarkHashPages256(b *testing.B) {
	pages := make([]byte, 256*PageSize)
	for i := range pages {
		pages[i] = byte(i*31 + i>>12)
	}
	hs := make([]Hash, 256)
	zs := make([]bool, 256)
	b.SetBytes(int64(len(pages)))
	for b.Loop() {
		hashPages(pages, hs, zs)
	}
}
