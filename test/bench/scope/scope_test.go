package scope

import (
	"context"
	"io"
	"strings"
	"testing"
)

func TestRunCleanupOrderAndFatal(t *testing.T) {
	root := New(context.Background(), "root", io.Discard)
	var order []string
	err := root.Run("case", func(tb testing.TB) {
		tb.Cleanup(func() { order = append(order, "first") })
		tb.Cleanup(func() { order = append(order, "second") })
		tb.Fatalf("boom %d", 1)
		order = append(order, "after fatal")
	})
	if err == nil || !strings.Contains(err.Error(), "boom 1") {
		t.Fatalf("Run error = %v, want the Fatalf message", err)
	}
	if got := strings.Join(order, ","); got != "second,first" {
		t.Fatalf("order = %s, want second,first (cleanups last first, nothing after Fatal)", got)
	}
	root.Finish()
}

func TestRunSkipFails(t *testing.T) {
	root := New(context.Background(), "root", io.Discard)
	err := root.Run("case", func(tb testing.TB) { tb.Skip("needs root") })
	if err == nil || !strings.Contains(err.Error(), "needs root") {
		t.Fatalf("Run error = %v, want a failure naming the reason", err)
	}
}

func TestRunPassAndNested(t *testing.T) {
	root := New(context.Background(), "root", io.Discard)
	var log []string
	err := root.Run("outer", func(tb testing.TB) {
		tb.Cleanup(func() { log = append(log, "outer cleanup") })
		inner := tb.(*T).Run("inner", func(tb testing.TB) {
			tb.Cleanup(func() { log = append(log, "inner cleanup") })
			tb.Errorf("inner failed")
		})
		if inner == nil {
			t.Error("inner Run returned nil after Errorf")
		}
		log = append(log, "outer continues")
		if tb.Failed() {
			t.Error("inner failure marked outer failed")
		}
	})
	if err != nil {
		t.Fatalf("outer Run: %v", err)
	}
	if got := strings.Join(log, ","); got != "inner cleanup,outer continues,outer cleanup" {
		t.Fatalf("log = %s", got)
	}
}
