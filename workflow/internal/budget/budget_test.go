package budget

import (
	"context"
	"testing"
	"time"
)

func TestByteBudgetHintsTakeHalf(t *testing.T) {
	b := New(100)
	if !b.TryHint(50) {
		t.Fatal("a hint of half the budget refused")
	}
	if b.TryHint(1) {
		t.Fatal("hints took more than half the budget")
	}
	// A run reads in the other half, and the hints wait for their share.
	if err := b.Acquire(context.Background(), 50); err != nil {
		t.Fatal(err)
	}
	b.HintTaken(50) // a worker took the hint: the bytes are its run's now
	if b.TryHint(1) {
		t.Fatal("a hint admitted over the whole budget")
	}
	b.Release(50)
	if !b.TryHint(40) {
		t.Fatal("hint refused with half the budget free")
	}
	if held, peak := b.Stats(); held != 90 || peak != 100 {
		t.Fatalf("held %d, peak %d; want 90, 100", held, peak)
	}
}

func TestByteBudgetAcquireWaitsForRelease(t *testing.T) {
	b := New(100)
	first := b.Hold(0)
	if err := first.Acquire(context.Background(), 80); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- b.Hold(0).Acquire(context.Background(), 30) }()
	select {
	case err := <-got:
		t.Fatalf("acquire over the budget returned %v at once", err)
	case <-time.After(50 * time.Millisecond):
	}
	first.Shrink(70) // a read reserved more than it took
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if held, peak := b.Stats(); held != 100 || peak != 100 {
		t.Fatalf("held %d, peak %d; want 100, 100", held, peak)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := b.Acquire(ctx, 1); err == nil {
		t.Fatal("acquire on a full budget succeeded")
	}
	// A run asking for more than the whole budget gets the whole budget,
	// not a wait that never ends.
	e := New(10)
	h := e.Hold(0)
	if err := h.Acquire(context.Background(), 20); err != nil || h.Held() != 10 {
		t.Fatalf("hold of 20 in a budget of 10: %d held, %v", h.Held(), err)
	}
}
