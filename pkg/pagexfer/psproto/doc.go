// Package psproto speaks CRIU's page-server protocol, in both roles.
//
// CRIU's dump side ("criu dump" with a page server, or a CRIU RPC dump with
// ps.fd) writes a stream of fixed-size command headers on one stream socket,
// each optionally followed by page data, and reads short replies on the same
// socket. The page server (criu page-server) is the other end: it reads the
// commands, writes the pages into pagemap-*.img/pages-*.img and answers.
//
// # Header
//
// Every command starts with a header in host byte order:
//
//	24 bytes (CRIU up to 4.1.x): u32 cmd | u32 nr_pages | u64 vaddr | u64 dst_id
//	32 bytes (CRIU 4.2 and later): u32 cmd | 4 bytes padding | u64 nr_pages | u64 vaddr | u64 dst_id
//
// Nothing on the wire says which layout is in use; both ends must be told
// (HeaderSize24, HeaderSize32, and HeaderSizeFor picks one from a CRIU
// version). cmd packs flags<<16 | op. dst_id packs image id<<8 | type, with
// type 1 for a task's pagemap (id = the task's pid as CRIU names the image)
// and 2 for shared memory (id = the shmem id).
//
// # Commands and replies
//
//	OPEN (3)         select the image dst_id; no reply (pre-OPEN2 CRIU)
//	OPEN2 (4)        select the image dst_id; reply: 1 byte, 1 if the image has a parent
//	PARENT (5)       ask whether dst_id has a parent image; reply: int32 (0 or 1)
//	ADD (1)          nr_pages present pages at vaddr; nr_pages*4096 bytes follow
//	HOLE (2)         nr_pages at vaddr live in the parent image; no data
//	ADD_F (6)        nr_pages at vaddr with flags PARENT (1), LAZY (2),
//	                 PRESENT (4); data follows iff PRESENT is set
//	GET (7)          lazy-pages request for nr_pages at vaddr of dst_id
//	CLOSE (0x1023)   end of stream; reply: int32 status (0)
//	FORCE_CLOSE (0x1024) the same, used when CRIU was handed the socket (ps.fd)
//
// CRIU 4.2.1 dumping a process sends OPEN2 for every image, ADD_F with
// PRESENT or PRESENT|LAZY for the pages, and FORCE_CLOSE (or CLOSE when it
// connected over TCP itself). Holes and the PARENT flag only appear when the
// page server answered OPEN2 with has-parent 1.
//
// # Validation
//
// The Decoder reads bytes from another process or another host, so it checks
// every header before anyone acts on it: the op must be known, flags are only
// allowed on ADD_F and must be a combination CRIU produces, the image type in
// dst_id must be a pagemap or shmem, a page command must name the image that
// was opened last, vaddr must be page-aligned, nr_pages must be non-zero for
// page commands and the range vaddr+nr_pages*4096 must fit in a 64-bit
// address space below 2^57 (the largest user address space Linux supports).
// Payloads are never read into memory by the Decoder: the caller reads them
// through a reader bounded to the command's length. Every error is a
// *DecodeError naming the byte offset in the stream where the bad field or
// the truncation is.
package psproto
