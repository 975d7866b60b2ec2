// Package pagexfer moves process memory between hosts: it speaks CRIU's
// page-server protocol on each host (package psproto) and carries pages
// between the agents with deduplication, compression and content-hash
// pre-copy.
//
// # Roles
//
// On the source, a Scanner runs pre-copy rounds while the process tree
// keeps running, and ForwardDump serves the final dump: CRIU writes its
// page stream into one end of a socket (ps.fd), ForwardDump reads it in
// CRIU's order and hands batches to a Sender. On the destination, a
// Receiver takes the batches: pre-copy content goes into a Store, and the
// final stream is replayed, as it arrives, into the local `criu
// page-server`, which writes the image files CRIU restores from.
//
//	CRIU dump ──ps.fd──► ForwardDump ─► Sender ─► BatchSink ══ gRPC ══► Receiver ─► criu page-server
//	live process ─► Scanner ───────────────┘                              │
//	                                                                   Store
//
// The Sender does not know the transport: the engine connects it to the
// Peer API through a BatchSink, and the receiving side calls
// Receiver.HandleBatch for every batch, in order.
//
// # Deduplication
//
// Pre-copy pages are hashed (SHA-256) and the destination's Store keeps
// their contents; the Sender keeps the set of those contents (Known). A
// pre-copy page whose content is known is not sent again. In the final
// dump a page whose content is known crosses the wire as its 32-byte hash,
// a page of zeros as one byte, any other page as its content, which the
// destination writes straight into CRIU's page server without keeping it:
// references always resolve from the Store, the destination holds no more
// than the pre-copied contents, and its images have no parent. Without
// pre-copy (stopcopy) nothing is known and the final dump is not hashed.
//
// The hash is SHA-256 and not BLAKE3: on 4 KiB pages BLAKE3 cannot use its
// wide SIMD (a page is four 1 KiB chunks), and with the SHA extensions of
// current x86 and arm64 CPUs crypto/sha256 measured faster
// (BenchmarkHashPage: 1.37 GB/s for SHA-256 against 1.17 GB/s for
// github.com/zeebo/blake3 on one core of the build machine) without a
// dependency. A cryptographic hash makes an accidental collision, which
// would silently restore wrong memory, not a practical concern.
//
// # Batches
//
// A Batch is about BatchSize (default 2 MiB) of records, optionally zstd
// compressed (a batch that does not shrink goes uncompressed), with the
// CRC-32C of the uncompressed payload. Batches of one Sender are numbered
// from 1 without gaps across pre-copy and final batches; the Receiver
// rejects a gap or a repeat. The Sender's goroutine compresses, paces (a
// token bucket, BandwidthLimit bytes/s) and sends; at most Pipeline closed
// batches wait for the sink, so a slow network blocks the producer, and
// through it CRIU. Counters report raw and wire bytes and what became of
// every page.
//
// The uncompressed payload, all integers little-endian:
//
//	version u8 (2) | kind u8 (1 pre-copy, 2 final) | records...
//
//	pre-copy records:
//	  1 PAGE    hash[32] data[4096]                      content the destination stores
//	  2 MAP     dst_id u64 | vaddr u64 | n u32 | n×hash[32]
//	                                                     page vaddr+i×4096 of image dst_id holds hash i
//	final records:
//	  3 CMD     op u16 | flags u16 | nr_pages u64 | vaddr u64 | dst_id u64 | entries
//	            a page-server command as CRIU sent it (see psproto); commands with
//	            data carry nr_pages entries, each one of:
//	              0 DATA  data[4096]
//	              1 REF   hash[32]
//	              2 ZERO
//
// A CRIU command with more pages than fit a batch is split into several
// CMD records of at most MaxRecordPages pages, each replayed as its own
// command. Decoding checks every length against the bytes present before
// using it, validates commands as psproto does, and reports a
// *RecordError with the offset.
//
// # Pre-copy without soft-dirty
//
// Kernels without soft-dirty tracking (many VM and arm64 kernels) cannot
// run `criu pre-dump`. The Scanner reads the live processes' memory
// instead (see Scanner): /proc/PID/maps for the mappings CRIU dumps,
// /proc/PID/pagemap for resident pages, process_vm_readv in large reads,
// and sends pages whose hash changed since the previous round. The final
// dump is authoritative: pre-copy only fills the store, so every page the
// final dump finds unchanged goes as a reference.
package pagexfer
