package pagexfer

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"testing"
	"testing/synctest"

	"github.com/migrated/migrated/pkg/pagexfer/psproto"
)

// TestSenderBackpressure: with a sink that does not take batches, the
// producer blocks after Pipeline closed batches plus the one the sink
// holds and the one being filled; nothing is buffered beyond that.
func TestSenderBackpressure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var got atomic.Int64
		sink := SinkFunc(func(ctx context.Context, b *Batch) error {
			got.Add(1)
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		const pipeline = 2
		s, err := NewSender(sink, SenderOptions{BatchSize: MinBatchSize, Pipeline: pipeline})
		if err != nil {
			t.Fatal(err)
		}
		perBatch := (MinBatchSize - payloadHeaderLen) / pageRecordLen
		rng := rand.New(rand.NewPCG(9, 9))
		pages := memory(rng, 10*perBatch, 0, 0)
		var accepted atomic.Int64
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			for _, p := range pages {
				if _, err := s.SendPage(ctx, HashPage(p), p); err != nil {
					done <- err
					return
				}
				accepted.Add(1)
			}
			done <- nil
		}()
		synctest.Wait() // producer and sink are both blocked now
		// One batch in the sink, Pipeline queued, one being filled (full).
		want := int64((1 + pipeline + 1) * perBatch)
		if got.Load() != 1 || accepted.Load() != want {
			t.Fatalf("blocked with %d batches at the sink and %d pages accepted, want 1 and %d", got.Load(), accepted.Load(), want)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("producer after cancel: %v", err)
		}
		close(release)
		s.Close()
	})
}

// TestForwardDumpCancel: a dump stream that stalls does not hold
// ForwardDump once its context ends.
func TestForwardDumpCancel(t *testing.T) {
	criu, ours := net.Pipe()
	defer criu.Close()
	defer ours.Close()
	s, err := NewSender(SinkFunc(func(context.Context, *Batch) error { return nil }), SenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := ForwardDump(ctx, ours, psproto.HeaderSize32, s)
		errc <- err
	}()
	// Half a header, then silence.
	if _, err := criu.Write(make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("ForwardDump after cancel: %v", err)
	}
}

// TestForwardDumpCRIUDies: the stream ending before CLOSE is an error.
func TestForwardDumpCRIUDies(t *testing.T) {
	criu, ours := net.Pipe()
	defer ours.Close()
	s, err := NewSender(SinkFunc(func(context.Context, *Batch) error { return nil }), SenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	go func() {
		enc := psproto.NewEncoder(criu, psproto.HeaderSize32)
		_ = enc.WriteHeader(psproto.Header{Cmd: psproto.OpOpen2, DstID: 0x101})
		_, _ = psproto.ReadHasParent(criu)
		criu.Close()
	}()
	if _, err := ForwardDump(context.Background(), ours, psproto.HeaderSize32, s); !errors.Is(err, ErrStreamEnded) {
		t.Fatalf("ForwardDump of a stream without CLOSE: %v", err)
	}
}
