package workflow

import (
	"context"
	"testing"
	"time"
)

func TestByteBudgetHintsTakeHalf(t *testing.T) {
	b := newByteBudget(100)
	if !b.tryHint(50) {
		t.Fatal("a hint of half the budget refused")
	}
	if b.tryHint(1) {
		t.Fatal("hints took more than half the budget")
	}
	// A run reads in the other half, and the hints wait for their share.
	if err := b.acquire(context.Background(), 50); err != nil {
		t.Fatal(err)
	}
	b.hintTaken(50) // a worker took the hint: the bytes are its run's now
	if b.tryHint(1) {
		t.Fatal("a hint admitted over the whole budget")
	}
	b.release(50)
	if !b.tryHint(40) {
		t.Fatal("hint refused with half the budget free")
	}
	if held, peak := b.stats(); held != 90 || peak != 100 {
		t.Fatalf("held %d, peak %d; want 90, 100", held, peak)
	}
}

func TestByteBudgetAcquireWaitsForRelease(t *testing.T) {
	b := newByteBudget(100)
	first := &hold{b: b}
	if err := first.acquire(context.Background(), 80); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- (&hold{b: b}).acquire(context.Background(), 30) }()
	select {
	case err := <-got:
		t.Fatalf("acquire over the budget returned %v at once", err)
	case <-time.After(50 * time.Millisecond):
	}
	first.shrink(70) // a read reserved more than it took
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if held, peak := b.stats(); held != 100 || peak != 100 {
		t.Fatalf("held %d, peak %d; want 100, 100", held, peak)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := b.acquire(ctx, 1); err == nil {
		t.Fatal("acquire on a full budget succeeded")
	}
	// A run asking for more than the whole budget gets the whole budget,
	// not a wait that never ends.
	e := newByteBudget(10)
	h := &hold{b: e}
	if err := h.acquire(context.Background(), 20); err != nil || h.n != 10 {
		t.Fatalf("hold of 20 in a budget of 10: %d held, %v", h.n, err)
	}
}

func TestQueueGivesHintBytesBack(t *testing.T) {
	b := newByteBudget(1000)
	q := newQueue()
	q.budget = b
	hint := func(n int) []byte {
		if !b.tryHint(int64(n)) {
			t.Fatalf("hint of %d refused", n)
		}
		return make([]byte, n)
	}
	q.add("a", hint(10), 1)
	q.add("a", hint(20), 2) // replaces the older hint
	q.add("a", hint(30), 1) // older than the one held: dropped
	if held, _ := b.stats(); held != 20 {
		t.Fatalf("held %d after replacing hints, want 20", held)
	}
	w, _ := q.get()
	if len(w.hint) != 20 || b.hinted.Load() != 0 {
		t.Fatalf("work hint %d bytes, %d still counted as hints", len(w.hint), b.hinted.Load())
	}
	q.add("a", hint(40), 3) // arrives while the run holds the other
	b.release(20)           // the run ends
	q.done("a", nil, 3)     // and covered generation 3
	q.add("b", hint(50), 1)
	q.dropHints()
	if held, _ := b.stats(); held != 0 || b.hinted.Load() != 0 {
		t.Fatalf("held %d, hinted %d after the queue dropped everything", held, b.hinted.Load())
	}
}
