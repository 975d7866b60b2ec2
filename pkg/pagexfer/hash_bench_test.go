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
