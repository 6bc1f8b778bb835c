package workflow

import (
	"context"
	"sync"
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
type byteBudget struct {
	mu      sync.Mutex
	max     int64
	held    int64 // hints and runs
	hinted  int64 // hints in the queue
	peak    int64
	changed chan struct{} // closed and replaced whenever bytes are released
}

func newByteBudget(max int64) *byteBudget {
	return &byteBudget{max: max, changed: make(chan struct{})}
}

// tryHint reserves n bytes for a feed body kept as a hint, if they fit in
// the hints' half.
func (b *byteBudget) tryHint(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.hinted+n > b.max/2 || b.held+n > b.max {
		return false
	}
	b.hinted += n
	b.take(n)
	return true
}

// hintTaken moves n hint bytes to the run that took the hint.
func (b *byteBudget) hintTaken(n int64) {
	b.mu.Lock()
	b.hinted -= n
	b.mu.Unlock()
}

// hintDropped releases a hint that no run will use.
func (b *byteBudget) hintDropped(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.hinted -= n
	b.mu.Unlock()
	b.release(n)
}

// acquire waits until n bytes fit, or the budget is empty: a document up to
// the size limit is always read eventually.
func (b *byteBudget) acquire(ctx context.Context, n int64) error {
	for {
		b.mu.Lock()
		if b.held+n <= b.max || b.held == 0 {
			b.take(n)
			b.mu.Unlock()
			return nil
		}
		ch := b.changed
		b.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// take adds n held bytes; b.mu is held.
func (b *byteBudget) take(n int64) {
	b.held += n
	b.peak = max(b.peak, b.held)
}

func (b *byteBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.held -= n
	close(b.changed)
	b.changed = make(chan struct{})
	b.mu.Unlock()
}

// stats returns the bytes held now and the most ever held.
func (b *byteBudget) stats() (held, peak int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held, b.peak
}

// hold is one run's share of the budget.
type hold struct {
	b *byteBudget
	n int64
}

// acquire replaces what the run holds with n bytes.
func (h *hold) acquire(ctx context.Context, n int64) error {
	h.release()
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
