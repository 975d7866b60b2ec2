package pagexfer

import "sync"

// Known is the set of page contents (by hash) the destination's Store
// holds. The Sender adds a hash when it puts a pre-copy page into a batch,
// so one Known serves every pre-copy round and the final dump of a
// migration. It is safe for concurrent use.
type Known struct {
	mu sync.RWMutex
	m  map[Hash]struct{}
}

// NewKnown returns an empty set.
func NewKnown() *Known { return &Known{m: make(map[Hash]struct{})} }

// Has reports whether the destination holds the content.
func (k *Known) Has(h Hash) bool {
	k.mu.RLock()
	_, ok := k.m[h]
	k.mu.RUnlock()
	return ok
}

// Add records that the destination holds the content; it reports whether
// the hash was new.
func (k *Known) Add(h Hash) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.m[h]; ok {
		return false
	}
	k.m[h] = struct{}{}
	return true
}

// Len is the number of distinct contents in the set.
func (k *Known) Len() int {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.m)
}
