// Package budget bounds the document bytes an engine holds, or a
// supervisor's engines hold together (workflow.Options.MaxPendingBytes).
package budget

import (
	"context"
	"sync/atomic"

	"golang.org/x/sync/semaphore"
)

// Budget bounds the document bytes an engine (or a supervisor's engines
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
type Budget struct {
	sem    *semaphore.Weighted
	max    int64
	held   atomic.Int64 // hints and runs, for Stats
	hinted atomic.Int64 // hints in the queue
	peak   atomic.Int64
}

// New returns a budget of max bytes.
func New(max int64) *Budget {
	return &Budget{sem: semaphore.NewWeighted(max), max: max}
}

// TryHint reserves n bytes for a feed body kept as a hint, if they fit in
// the hints' half and no run waits for budget.
func (b *Budget) TryHint(n int64) bool {
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

// HintTaken moves n hint bytes to the run that took the hint.
func (b *Budget) HintTaken(n int64) { b.hinted.Add(-n) }

// HintDropped releases a hint that no run will use.
func (b *Budget) HintDropped(n int64) {
	b.hinted.Add(-n)
	b.Release(n)
}

// Acquire waits until n bytes (at most the whole budget) are free.
func (b *Budget) Acquire(ctx context.Context, n int64) error {
	if err := b.sem.Acquire(ctx, n); err != nil {
		return err
	}
	b.took(n)
	return nil
}

func (b *Budget) took(n int64) {
	h := b.held.Add(n)
	for p := b.peak.Load(); h > p && !b.peak.CompareAndSwap(p, h); p = b.peak.Load() {
	}
}

// Release gives back n bytes a run held.
func (b *Budget) Release(n int64) {
	if n == 0 {
		return
	}
	b.held.Add(-n)
	b.sem.Release(n)
}

// Stats returns the bytes held now and the most ever held.
func (b *Budget) Stats() (held, peak int64) {
	return b.held.Load(), b.peak.Load()
}

// Hinted is how many of the bytes held are hints waiting in a queue.
func (b *Budget) Hinted() int64 { return b.hinted.Load() }

// Hold is one run's share of the budget.
type Hold struct {
	b *Budget
	n int64
}

// Hold returns a run's share holding n bytes already reserved (a hint
// the run took).
func (b *Budget) Hold(n int64) *Hold { return &Hold{b: b, n: n} }

// Held is how many bytes the run holds.
func (h *Hold) Held() int64 { return h.n }

// Acquire replaces what the run holds with n bytes. n is capped at the
// whole budget, which a semaphore could never grant.
func (h *Hold) Acquire(ctx context.Context, n int64) error {
	h.Release()
	n = min(n, h.b.max)
	if err := h.b.Acquire(ctx, n); err != nil {
		return err
	}
	h.n = n
	return nil
}

// Shrink gives back all but n of the bytes held (a read reserved the size
// limit and got less).
func (h *Hold) Shrink(n int64) {
	if n < h.n {
		h.b.Release(h.n - n)
		h.n = n
	}
}

// Release gives back everything the run holds.
func (h *Hold) Release() {
	h.b.Release(h.n)
	h.n = 0
}
