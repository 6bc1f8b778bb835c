package workflow

import (
	"context"
	"sync"
)

// token identifies one received change in the tracker.
type token struct {
	gen uint64
	n   uint64
	// rev is the change's revision generation (0 unknown): a run that read
	// this generation or a newer one has covered the change.
	rev int
}

// tracker computes the checkpoint: the seq of the newest change such that it
// and every change received before it are finished. Changes are kept in feed
// order, so seqs are never compared and stay opaque strings (CouchDB 3's are
// opaque; PouchDB Server's are numbers).
type tracker struct {
	mu      sync.Mutex
	gen     uint64
	base    uint64 // token number of entries[head]
	head    int
	entries []trackEntry
	last    string // checkpoint: seq of the last change popped as finished
	space   chan struct{}
}

type trackEntry struct {
	seq  string
	done bool
}

func newTracker(since string) *tracker {
	return &tracker{last: since, space: make(chan struct{}, 1)}
}

// add records a received change that must be finished before the checkpoint
// may pass it.
func (t *tracker) add(seq string) token {
	t.mu.Lock()
	defer t.mu.Unlock()
	tok := token{gen: t.gen, n: t.base + uint64(len(t.entries)-t.head)}
	t.entries = append(t.entries, trackEntry{seq: seq})
	return tok
}

// addDone records a position with nothing to do, such as a feed's last_seq.
func (t *tracker) addDone(seq string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.entries = append(t.entries, trackEntry{seq: seq, done: true})
	t.advance()
}

// done marks changes finished. Tokens from before a reset are ignored.
func (t *tracker) done(toks []token) {
	if len(toks) == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, tok := range toks {
		if tok.gen != t.gen || tok.n < t.base {
			continue
		}
		t.entries[t.head+int(tok.n-t.base)].done = true
	}
	t.advance()
}

func (t *tracker) advance() {
	i := t.head
	for i < len(t.entries) && t.entries[i].done {
		t.last = t.entries[i].seq
		i++
	}
	if i == t.head {
		return
	}
	clear(t.entries[t.head:i])
	t.base += uint64(i - t.head)
	t.head = i
	// Compact once the finished prefix is the larger part, so the slice is
	// reused and each entry is moved O(1) times on average.
	if t.head > len(t.entries)/2 {
		n := copy(t.entries, t.entries[t.head:])
		t.entries = t.entries[:n]
		t.head = 0
	}
	select {
	case t.space <- struct{}{}:
	default:
	}
}

// checkpoint returns the seq up to which everything is finished.
func (t *tracker) checkpoint() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.last
}

// pending returns how many received changes are not yet passed.
func (t *tracker) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries) - t.head
}

// reset starts over from since, e.g. after the database was re-created.
// Outstanding tokens become void.
func (t *tracker) reset(since string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gen++
	t.base = 0
	t.head = 0
	t.entries = nil
	t.last = since
	select {
	case t.space <- struct{}{}:
	default:
	}
}

// waitBelow blocks until fewer than max changes are pending: the feed's
// backpressure, so a slow handler cannot make memory grow without bound.
func (t *tracker) waitBelow(ctx context.Context, max int) error {
	for {
		if t.pending() < max {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.space:
		}
	}
}
