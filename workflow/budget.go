package workflow

import (
	"context"
	"sync/atomic"

	"golang.org/x/sync/semaphore"
)

// byteBudget bounds the document bytes an engine (or a supervisor's engines
// together) holds: feed bodies kept in the queue as read hints, and the
// document each run read. It counts each body once, as received; the working
// copies made from it (the parsed fields, the body written back) come on top
// and are freed with it.
//
// Hints may take only half of it. Hints wait in the queue for a worker, and a
// worker that must read a document waits for budget: without the split,
// queued hints could hold the whole budget while every worker waits to read,
// and no worker would ever take the hints. A read waits only for runs in
// progress, which end without asking for more.
//
// The weighted semaphore hands freed bytes to waiting runs in order, waking
// only those that fit: hundreds of workers may wait at once, and a broadcast
// per release would wake them all for each finished run.
type byteBudget struct {
	sem    *semaphore.Weighted
	max    int64
	held   atomic.Int64 // hints and runs, for Stats
	hinted atomic.Int64 // hints in the queue
	peak   atomic.Int64
}

func newByteBudget(max int64) *byteBudget {
	return &byteBudget{sem: semaphore.NewWeighted(max), max: max}
}

// tryHint reserves n bytes for a feed body kept as a hint, if they fit in
// the hints' half and no run waits for budget.
func (b *byteBudget) tryHint(n int64) bool {
	if b.hinted.Add(n) > b.max/2 {
		b.hinted.Add(-n)
		return false
	}
	if !b.sem.TryAcquire(n) {
		b.hinted.Add(-n)
		return false
	}
	b.took(n)
	return true
}

// hintTaken moves n hint bytes to the run that took the hint.
func (b *byteBudget) hintTaken(n int64) { b.hinted.Add(-n) }

// hintDropped releases a hint that no run will use.
func (b *byteBudget) hintDropped(n int64) {
	b.hinted.Add(-n)
	b.release(n)
}

// acquire waits until n bytes (at most the whole budget) are free.
func (b *byteBudget) acquire(ctx context.Context, n int64) error {
	if err := b.sem.Acquire(ctx, n); err != nil {
		return err
	}
	b.took(n)
	return nil
}

func (b *byteBudget) took(n int64) {
	h := b.held.Add(n)
	for p := b.peak.Load(); h > p && !b.peak.CompareAndSwap(p, h); p = b.peak.Load() {
	}
}

func (b *byteBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.held.Add(-n)
	b.sem.Release(n)
}

// stats returns the bytes held now and the most ever held.
func (b *byteBudget) stats() (held, peak int64) {
	return b.held.Load(), b.peak.Load()
}

// hold is one run's share of the budget.
type hold struct {
	b *byteBudget
	n int64
}

// acquire replaces what the run holds with n bytes. n is capped at the
// whole budget, which a semaphore could never grant.
func (h *hold) acquire(ctx context.Context, n int64) error {
	h.release()
	n = min(n, h.b.max)
	if err := h.b.acquire(ctx, n); err != nil {
		return err
	}
	h.n = n
	return nil
}

// shrink gives back all but n of the bytes held (a read reserved the size
// limit and got less).
func (h *hold) shrink(n int64) {
	if n < h.n {
		h.b.release(h.n - n)
		h.n = n
	}
}

func (h *hold) release() {
	h.b.release(h.n)
	h.n = 0
}
