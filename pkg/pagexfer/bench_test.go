package pagexfer_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/migrated/migrated/pkg/criurpc"
	"github.com/migrated/migrated/pkg/pagexfer"
	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

const benchMiB = 256

// benchMemory returns benchMiB of random or text-like pages.
func benchMemory(compressible bool) []byte {
	rng := rand.New(rand.NewPCG(7, 8))
	mem := make([]byte, benchMiB<<20)
	if !compressible {
		for i := 0; i < len(mem); i += 8 {
			v := rng.Uint64()
			for j := range 8 {
				mem[i+j] = byte(v >> (8 * j))
			}
		}
		return mem
	}
	words := []string{"migrate ", "process ", "memory ", "page ", "checkpoint ", "restore ", "the ", "a ", "of ", "\n"}
	for i := 0; i < len(mem); {
		i += copy(mem[i:], words[rng.IntN(len(words))])
	}
	return mem
}

// writeDump writes mem as CRIU would: OPEN2, ADD_F PRESENT commands of 64
// pages, FORCE_CLOSE, reading the replies.
func writeDump(conn net.Conn, mem []byte) error {
	enc := psproto.NewEncoder(conn, psproto.HeaderSize32)
	pid := psproto.DstID(psproto.TypePagemap, 4242)
	if err := enc.WriteHeader(psproto.Header{Cmd: psproto.OpOpen2, DstID: pid}); err != nil {
		return err
	}
	if _, err := psproto.ReadHasParent(conn); err != nil {
		return err
	}
	const chunk = 64 * pagexfer.PageSize
	for off := 0; off < len(mem); off += chunk {
		h := psproto.Header{Cmd: psproto.OpAddF, Flags: psproto.FlagPresent, NrPages: 64, Vaddr: 0x7f0000000000 + uint64(off), DstID: pid}
		if err := enc.WriteCommand(h, mem[off:off+chunk]); err != nil {
			return err
		}
	}
	if err := enc.WriteHeader(psproto.Header{Cmd: psproto.OpForceClose}); err != nil {
		return err
	}
	_, err := psproto.ReadStatus(conn)
	return err
}

// discardPageServer answers like criu page-server and drops the pages.
func discardPageServer(conn net.Conn) error {
	dec := psproto.NewDecoder(conn, psproto.HeaderSize32)
	for {
		h, err := dec.Next()
		if err != nil {
			return err
		}
		switch {
		case h.Cmd == psproto.OpOpen2:
			if err := psproto.WriteHasParent(conn, false); err != nil {
				return err
			}
		case h.Cmd == psproto.OpForceClose || h.Cmd == psproto.OpClose:
			return psproto.WriteStatus(conn, 0)
		case h.HasData():
			if err := dec.Discard(); err != nil {
				return err
			}
		}
	}
}

// BenchmarkLoopback moves benchMiB through the whole path without CRIU:
// a dump stream on a unix socket, ForwardDump, a Sender, gRPC on
// loopback TCP, a Receiver and its replay into a page server that drops
// the pages. MB/s is of memory moved.
func BenchmarkLoopback(b *testing.B) {
	for _, content := range []string{"random", "text"} {
		mem := benchMemory(content == "text")
		for _, comp := range []pagexfer.Compression{pagexfer.CompressionNone, pagexfer.CompressionZstd} {
			b.Run(fmt.Sprintf("%s/%v", content, comp), func(b *testing.B) {
				b.SetBytes(int64(len(mem)))
				var wire, raw uint64
				for b.Loop() {
					b.StopTimer()
					l := newLink(b, pagexfer.SenderOptions{Compression: comp})
					src, criuSide := socketpair(b)
					criuConn, err := net.FileConn(criuSide)
					if err != nil {
						b.Fatal(err)
					}
					psOurs, psFile := socketpair(b)
					psConn, err := net.FileConn(psFile)
					if err != nil {
						b.Fatal(err)
					}
					ctx := context.Background()
					if err := l.recv.StartReplay(ctx, psOurs, psproto.HeaderSize32); err != nil {
						b.Fatal(err)
					}
					errs := make(chan error, 2)
					b.StartTimer()
					go func() { errs <- writeDump(criuConn, mem) }()
					go func() { errs <- discardPageServer(psConn) }()
					st, err := pagexfer.ForwardDump(ctx, src, psproto.HeaderSize32, l.sender)
					if err != nil {
						b.Fatal(err)
					}
					if err := l.recv.Finish(ctx); err != nil {
						b.Fatal(err)
					}
					for range 2 {
						if err := <-errs; err != nil {
							b.Fatal(err)
						}
					}
					b.StopTimer()
					criuConn.Close()
					psConn.Close()
					wire += st.Counters.WireBytes
					raw += uint64(len(mem))
					b.StartTimer()
				}
				b.ReportMetric(float64(wire)/float64(raw), "wire/raw")
			})
		}
	}
}

// BenchmarkRealDump dumps a benchMiB memhog through real CRIU, in every
// iteration twice: straight into CRIU's own page server over loopback TCP,
// and through pagexfer (ForwardDump, gRPC on loopback, replay into criu
// page-server over a socketpair). Each time runs from the dump request to
// the page server's exit (its images complete). The two paths alternate
// which goes first, so load from elsewhere on the machine hits both alike.
// Metrics: MB/s of workload memory for each path, and their ratio.
func BenchmarkRealDump(b *testing.B) {
	for _, content := range []string{"random", "text"} {
		var extra []string
		if content == "text" {
			extra = append(extra, "--compressible")
		}
		for _, comp := range []pagexfer.Compression{pagexfer.CompressionNone, pagexfer.CompressionZstd} {
			b.Run(fmt.Sprintf("%s/%v", content, comp), func(b *testing.B) {
				c, hdr := realClient(b)
				var criuTime, oursTime time.Duration
				var wire, raw uint64
				i := 0
				for b.Loop() {
					for k := range 2 {
						w := startMemhog(b, benchMiB, extra...)
						dst := b.TempDir()
						if (i+k)%2 == 0 {
							criuTime += dumpToCRIUPageServer(b, c, w, dst)
						} else {
							l := newLink(b, pagexfer.SenderOptions{Compression: comp})
							r := dumpThrough(b, c, hdr, l, w, dst)
							oursTime += r.elapsed
							wire += r.dump.Counters.WireBytes
							raw += r.dump.Pages * pagexfer.PageSize
						}
					}
					i++
				}
				mb := float64(b.N) * float64(benchMiB<<20) / 1e6
				b.ReportMetric(mb/criuTime.Seconds(), "criu-MB/s")
				b.ReportMetric(mb/oursTime.Seconds(), "pagexfer-MB/s")
				b.ReportMetric(criuTime.Seconds()/oursTime.Seconds(), "ratio")
				b.ReportMetric(float64(wire)/float64(raw), "wire/raw")
			})
		}
	}
}

func dumpToCRIUPageServer(b *testing.B, c *criurpc.Client, w *memhog, dst string) time.Duration {
	b.Helper()
	ctx := context.Background()
	ps, err := c.StartPageServer(ctx, criurpc.PageServerOptions{ImagesDir: dst, Address: "127.0.0.1"})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	_, err = c.Dump(ctx, criurpc.DumpOptions{ImagesDir: b.TempDir(), PID: w.pid,
		PageServer: &criurpc.PageServerTarget{Address: "127.0.0.1", Port: ps.Port}}, nil)
	if err != nil {
		_ = ps.Kill()
		b.Fatalf("dump: %v", err)
	}
	if err := ps.Wait(ctx); err != nil {
		b.Fatalf("page server: %v", err)
	}
	d := time.Since(start)
	_ = w.cmd.Wait()
	w.cmd = nil
	return d
}
