package workflow

import (
	"container/heap"
	"context"
	"sync"
	"time"

	"github.com/docstate/docstate/workflow/internal/budget"
)

// queue holds document ids waiting for a worker, in the manner of client-go's
// workqueue: an id is queued at most once however often it is added
// (coalescing), an id being processed is never handed to a second worker (an
// add while processing marks it dirty and re-queues it when done), and adds
// can be delayed.
//
// Besides the id an entry carries the newest document body the feed delivered
// (a read hint that spares a GET) and the checkpoint tokens of the changes the
// next run will cover.
type queue struct {
	mu       sync.Mutex
	cond     *sync.Cond
	fifo     []string
	items    map[string]*entry
	failures map[string]int
	closed   bool

	delayed   delayHeap
	scheduled map[string]time.Time
	wake      chan struct{}

	// budget holds the bytes of the hints (nil: not counted). A hint
	// handed to add was reserved with budget.TryHint; the queue gives it
	// back when it drops the hint, or passes it on with the work.
	budget *budget.Budget
}

type entry struct {
	queued     bool
	processing bool
	dirty      bool
	// plainDirty: added without a feed change while processing (a timer,
	// a scan), which asks for another look whatever the run read.
	plainDirty bool
	hint       []byte
	hintGen    int
	tokens     []token
}

// work is one run's share of an entry.
type work struct {
	id     string
	hint   []byte
	tokens []token
}

func newQueue() *queue {
	q := &queue{
		items:     make(map[string]*entry),
		failures:  make(map[string]int),
		scheduled: make(map[string]time.Time),
		wake:      make(chan struct{}, 1),
	}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// add queues id. hint may be nil; a hint older than the one held is ignored.
func (q *queue) add(id string, hint []byte, hintGen int, toks ...token) {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.items[id]
	if e == nil {
		e = &entry{}
		q.items[id] = e
	}
	if hint != nil && hintGen >= e.hintGen {
		q.dropHint(e.hint)
		e.hint, e.hintGen = hint, hintGen
	} else {
		q.dropHint(hint)
	}
	e.tokens = append(e.tokens, toks...)
	if e.processing {
		e.dirty = true
		if len(toks) == 0 && hint == nil {
			e.plainDirty = true
		}
		return
	}
	if !e.queued && !q.closed {
		e.queued = true
		q.fifo = append(q.fifo, id)
		q.cond.Signal()
	}
}

// addIfBusy adds toks to id if a run of id is in progress, and reports
// whether it did: the run's end then finishes those it covers and queues
// id again for the others.
func (q *queue) addIfBusy(id string, toks ...token) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.items[id]
	if e == nil || !e.processing {
		return false
	}
	e.tokens = append(e.tokens, toks...)
	e.dirty = true
	return true
}

// get blocks until an id is ready or the queue is closed.
func (q *queue) get() (work, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.fifo) == 0 && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		// Draining: queued ids are not started; their changes stay pending
		// in the checkpoint and are replayed after a restart.
		return work{}, false
	}
	id := q.fifo[0]
	q.fifo[0] = ""
	q.fifo = q.fifo[1:]
	e := q.items[id]
	e.queued = false
	e.processing = true
	w := work{id: id, hint: e.hint, tokens: e.tokens}
	if q.budget != nil && e.hint != nil {
		q.budget.HintTaken(int64(len(e.hint)))
	}
	e.hint, e.hintGen, e.tokens = nil, 0, nil
	return w, true
}

// done ends a run of id. Tokens given back (the run did not finish) stay with
// the entry for its next run. When the run finished having read revision
// generation covered, changes that arrived meanwhile for that generation or
// an older one are covered by it: they are returned for the caller to mark
// finished, and do not queue the id again.
func (q *queue) done(id string, giveBack []token, covered int) []token {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.items[id]
	e.processing = false
	var finished []token
	if covered > 0 && len(giveBack) == 0 && !e.plainDirty {
		keep := e.tokens[:0]
		for _, t := range e.tokens {
			if t.rev > 0 && t.rev <= covered {
				finished = append(finished, t)
			} else {
				keep = append(keep, t)
			}
		}
		e.tokens = keep
		if e.hint != nil && e.hintGen <= covered {
			q.dropHint(e.hint)
			e.hint, e.hintGen = nil, 0
		}
		if len(e.tokens) == 0 && e.hint == nil {
			e.dirty = false
		}
	}
	e.plainDirty = false
	e.tokens = append(giveBack, e.tokens...)
	if e.dirty {
		e.dirty = false
		if !q.closed {
			e.queued = true
			q.fifo = append(q.fifo, id)
			q.cond.Signal()
		}
		return finished
	}
	if len(e.tokens) == 0 && e.hint == nil {
		delete(q.items, id)
	}
	return finished
}

// dropHint gives a hint's bytes back; q.mu is held.
func (q *queue) dropHint(hint []byte) {
	if q.budget != nil && len(hint) > 0 {
		q.budget.HintDropped(int64(len(hint)))
	}
}

// dropHints drops every hint still queued, for an engine that stopped: its
// queue goes away, the budget it shares with other engines stays.
func (q *queue) dropHints() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, e := range q.items {
		q.dropHint(e.hint)
		e.hint, e.hintGen = nil, 0
	}
}

// addAfter queues id after d. Only the earliest pending delay per id is kept:
// a later one would be covered by the earlier run anyway.
func (q *queue) addAfter(id string, d time.Duration) {
	if d <= 0 {
		q.add(id, nil, 0)
		return
	}
	at := time.Now().Add(d)
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	if cur, ok := q.scheduled[id]; ok && !at.Before(cur) {
		return
	}
	q.scheduled[id] = at
	heap.Push(&q.delayed, delayed{id: id, at: at})
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// failed counts a transient failure of id and returns how many in a row.
func (q *queue) failed(id string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.failures[id]++
	return q.failures[id]
}

// forget clears id's failure count after a run that finished.
func (q *queue) forget(id string) {
	q.mu.Lock()
	delete(q.failures, id)
	q.mu.Unlock()
}

// len returns the number of ids waiting for a worker.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.fifo)
}

// delayedLen returns the number of ids waiting for a timer.
func (q *queue) delayedLen() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.scheduled)
}

// nextDue returns the earliest time an id waits for (zero: none), leaving
// out the ids skip names.
func (q *queue) nextDue(skip func(id string) bool) time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	var first time.Time
	for id, at := range q.scheduled {
		if skip != nil && skip(id) {
			continue
		}
		if first.IsZero() || at.Before(first) {
			first = at
		}
	}
	return first
}

// close stops handing out ids and wakes every waiting worker.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// runTimers moves delayed ids into the queue when due, until ctx ends.
func (q *queue) runTimers(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		q.mu.Lock()
		now := time.Now()
		var ready []string
		for len(q.delayed) > 0 && !q.delayed[0].at.After(now) {
			d := heap.Pop(&q.delayed).(delayed)
			if at, ok := q.scheduled[d.id]; ok && at.Equal(d.at) {
				delete(q.scheduled, d.id)
				ready = append(ready, d.id)
			}
		}
		next := time.Hour
		if len(q.delayed) > 0 {
			next = q.delayed[0].at.Sub(now)
		}
		q.mu.Unlock()
		for _, id := range ready {
			q.add(id, nil, 0)
		}
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return
		case <-q.wake:
		case <-timer.C:
		}
	}
}

type delayed struct {
	id string
	at time.Time
}

type delayHeap []delayed

func (h delayHeap) Len() int           { return len(h) }
func (h delayHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h delayHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *delayHeap) Push(x any)        { *h = append(*h, x.(delayed)) }
func (h *delayHeap) Pop() any {
	old := *h
	n := len(old)
	x := old[n-1]
	*h = old[:n-1]
	return x
}
