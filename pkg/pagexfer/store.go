package pagexfer

import (
	"fmt"
	"os"
	"sync"
)

// Store holds page contents by hash on the destination, and the latest
// content recorded for each (image, vaddr).
//
// Contents live in memory up to the budget given to NewStore; beyond it
// they are appended to a spill file under the store's directory, which
// Close removes. Contents are never dropped while the store is open: a
// reference the source sends must always resolve. The (image, vaddr)
// index lives in memory (about 60 bytes an entry) outside the budget. A
// Store is safe for concurrent use.
type Store struct {
	mu       sync.RWMutex
	budget   int64
	dir      string
	chunks   [][]byte // in-memory pages, storeChunk pages each
	memPages int64
	index    map[Hash]int64 // >= 0: in-memory page number; < 0: -(spill page number)-1
	maps     map[mapKey]Hash
	spill    *os.File
	spilled  int64
	closed   bool
}

type mapKey struct{ dst, vaddr uint64 }

const storeChunk = 256 // pages per in-memory chunk (1 MiB)

// StoreStats describe a Store's contents.
type StoreStats struct {
	Pages        int64 // distinct contents held
	MemoryPages  int64 // of which in memory
	SpilledPages int64 // of which in the spill file
	Mappings     int64 // (image, vaddr) entries
}

// NewStore returns an empty store that keeps up to memBudget bytes of page
// content in memory and spills the rest to a file under dir.
func NewStore(dir string, memBudget int64) (*Store, error) {
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("page store: %w", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("page store: %s is not a directory", dir)
	}
	return &Store{
		budget: max(memBudget, 0),
		dir:    dir,
		index:  make(map[Hash]int64),
		maps:   make(map[mapKey]Hash),
	}, nil
}

// Put stores one page of content under its hash; storing a hash again is
// a no-op.
func (s *Store) Put(h Hash, data []byte) error {
	if len(data) != PageSize {
		return fmt.Errorf("page store: put %d bytes, want %d", len(data), PageSize)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("page store: %w", ErrClosed)
	}
	if _, ok := s.index[h]; ok {
		return nil
	}
	if (s.memPages+1)*PageSize <= s.budget {
		n := s.memPages
		if n%storeChunk == 0 {
			s.chunks = append(s.chunks, make([]byte, storeChunk*PageSize))
		}
		copy(s.chunks[n/storeChunk][(n%storeChunk)*PageSize:], data)
		s.memPages++
		s.index[h] = n
		return nil
	}
	if s.spill == nil {
		f, err := os.CreateTemp(s.dir, "pagestore-*.spill")
		if err != nil {
			return fmt.Errorf("page store: spill file: %w", err)
		}
		s.spill = f
	}
	if _, err := s.spill.WriteAt(data, s.spilled*PageSize); err != nil {
		return fmt.Errorf("page store: spill: %w", err)
	}
	s.index[h] = -s.spilled - 1
	s.spilled++
	return nil
}

// Has reports whether the store holds the content.
func (s *Store) Has(h Hash) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.index[h]
	return ok
}

// Get copies the content with hash h into dst (PageSize bytes).
func (s *Store) Get(h Hash, dst []byte) error {
	if len(dst) < PageSize {
		return fmt.Errorf("page store: get into %d bytes", len(dst))
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("page store: %w", ErrClosed)
	}
	loc, ok := s.index[h]
	if !ok {
		return fmt.Errorf("page store: %w: %v", ErrUnknownHash, h)
	}
	if loc >= 0 {
		copy(dst, s.chunks[loc/storeChunk][(loc%storeChunk)*PageSize:][:PageSize])
		return nil
	}
	if _, err := s.spill.ReadAt(dst[:PageSize], (-loc-1)*PageSize); err != nil {
		return fmt.Errorf("page store: read spill: %w", err)
	}
	return nil
}

// Page returns the content: the store's own memory for a page it holds
// in memory (never modified; the caller must not modify it either), or
// the page read into scratch (at least PageSize bytes) for a spilled one.
// It saves the copy Get makes where the caller only reads the page.
func (s *Store) Page(h Hash, scratch []byte) ([]byte, error) {
	s.mu.RLock()
	loc, ok := s.index[h]
	closed := s.closed
	var mem []byte
	if ok && loc >= 0 && !closed {
		mem = s.chunks[loc/storeChunk][(loc%storeChunk)*PageSize:][:PageSize:PageSize]
	}
	s.mu.RUnlock()
	if mem != nil {
		return mem, nil
	}
	if err := s.Get(h, scratch); err != nil {
		return nil, err
	}
	return scratch[:PageSize], nil
}

// SetMapping records that page vaddr of image dst (a psproto dst_id) holds
// content h.
func (s *Store) SetMapping(dst, vaddr uint64, h Hash) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.maps[mapKey{dst, vaddr}] = h
	}
}

// Mapping returns the content last recorded for page vaddr of image dst.
func (s *Store) Mapping(dst, vaddr uint64) (Hash, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	h, ok := s.maps[mapKey{dst, vaddr}]
	return h, ok
}

// Stats describe the store's contents.
func (s *Store) Stats() StoreStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return StoreStats{
		Pages:        int64(len(s.index)),
		MemoryPages:  s.memPages,
		SpilledPages: s.spilled,
		Mappings:     int64(len(s.maps)),
	}
}

// Close drops the contents and removes the spill file.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.chunks, s.index, s.maps = nil, nil, nil
	if s.spill != nil {
		name := s.spill.Name()
		err := s.spill.Close()
		if rerr := os.Remove(name); err == nil {
			err = rerr
		}
		if err != nil {
			return fmt.Errorf("page store: close: %w", err)
		}
	}
	return nil
}
