package workflow

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/workflow/internal/retry"
)

func TestQueueCoalescesAndNeverRunsAnIDTwiceAtOnce(t *testing.T) {
	q := newQueue()
	q.add("a", nil, 0)
	q.add("a", nil, 0)
	q.add("b", nil, 0)
	if got := q.len(); got != 2 {
		t.Fatalf("queued %d ids, want 2 (duplicates coalesce)", got)
	}
	w, _ := q.get()
	if w.id != "a" {
		t.Fatalf("first id %q, want a (FIFO)", w.id)
	}
	// Added while processing: not handed out again until done.
	q.add("a", []byte(`{"_id":"a"}`), 2)
	w2, _ := q.get()
	if w2.id != "b" {
		t.Fatalf("got %q while a is processing, want b", w2.id)
	}
	if q.len() != 0 {
		t.Fatalf("a was queued while still processing")
	}
	q.done("a", nil, 0)
	w3, _ := q.get()
	if w3.id != "a" || string(w3.hint) != `{"_id":"a"}` {
		t.Fatalf("dirty a not re-queued with its hint after done: %+v", w3)
	}
}

func TestQueueKeepsNewestHintAndGivenBackTokens(t *testing.T) {
	q := newQueue()
	q.add("a", []byte("new"), 3, token{n: 1})
	q.add("a", []byte("old"), 2, token{n: 2})
	w, _ := q.get()
	if string(w.hint) != "new" || len(w.tokens) != 2 {
		t.Fatalf("hint %q tokens %v, want newest hint and both tokens", w.hint, w.tokens)
	}
	q.done("a", w.tokens, 0)
	q.add("a", nil, 0, token{n: 3})
	w, _ = q.get()
	if len(w.tokens) != 3 || w.tokens[0].n != 1 {
		t.Fatalf("tokens %v, want given-back tokens first", w.tokens)
	}
}

func TestQueueConcurrentWorkersNeverOverlapOnOneID(t *testing.T) {
	q := newQueue()
	var running [10]atomic.Int32
	var overlaps, runs atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				w, ok := q.get()
				if !ok {
					return
				}
				i := int(w.id[0] - '0')
				if running[i].Add(1) > 1 {
					overlaps.Add(1)
				}
				runs.Add(1)
				time.Sleep(50 * time.Microsecond)
				running[i].Add(-1)
				q.done(w.id, nil, 0)
			}
		})
	}
	for i := range 5000 {
		q.add(string(rune('0'+i%10)), nil, 0)
	}
	deadline := time.Now().Add(5 * time.Second)
	for (q.len() > 0 || runs.Load() == 0) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond)
	q.close()
	wg.Wait()
	if overlaps.Load() != 0 {
		t.Fatalf("%d overlapping runs of one id", overlaps.Load())
	}
	if runs.Load() >= 5000 {
		t.Fatalf("%d runs for 5000 adds of 10 ids: nothing coalesced", runs.Load())
	}
}

func TestQueueDelayedAddsKeepEarliest(t *testing.T) {
	q := newQueue()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { q.runTimers(ctx) })
	defer func() { cancel(); wg.Wait() }()
	q.addAfter("a", time.Hour)
	q.addAfter("a", 20*time.Millisecond)
	q.addAfter("a", time.Hour) // later than the pending one: ignored
	start := time.Now()
	got := make(chan work, 1)
	go func() { w, _ := q.get(); got <- w }()
	select {
	case w := <-got:
		if w.id != "a" {
			t.Fatalf("got %q", w.id)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("delayed add took %v", el)
		}
	case <-time.After(5 * time.Second):
		q.close()
		t.Fatal("delayed id never arrived")
	}
	if q.delayedLen() != 0 {
		t.Fatalf("%d delayed ids left", q.delayedLen())
	}
}

func TestQueueCloseWakesWaitersAndStopsHandingOut(t *testing.T) {
	q := newQueue()
	done := make(chan bool)
	go func() { _, ok := q.get(); done <- ok }()
	time.Sleep(10 * time.Millisecond)
	q.close()
	if ok := <-done; ok {
		t.Fatal("get returned an item after close")
	}
	q.add("a", nil, 0)
	if _, ok := q.get(); ok {
		t.Fatal("closed queue handed out an id")
	}
}

func TestTrackerLowWaterMark(t *testing.T) {
	tr := newTracker("0")
	a, b, c := tr.add("1"), tr.add("2"), tr.add("3")
	tr.done([]token{b, c})
	if got := tr.checkpoint(); got != "0" {
		t.Fatalf("checkpoint %q passed an unfinished change", got)
	}
	tr.done([]token{a})
	if got := tr.checkpoint(); got != "3" {
		t.Fatalf("checkpoint %q, want 3", got)
	}
	tr.addDone("7")
	if got, n := tr.checkpoint(), tr.pending(); got != "7" || n != 0 {
		t.Fatalf("checkpoint %q pending %d, want 7 and 0", got, n)
	}
	stale := tr.add("8")
	tr.reset("0")
	tr.done([]token{stale})
	if got, n := tr.checkpoint(), tr.pending(); got != "0" || n != 0 {
		t.Fatalf("after reset: checkpoint %q pending %d", got, n)
	}
}

func TestTrackerOutOfOrderCompletionAtScale(t *testing.T) {
	tr := newTracker("0")
	const n = 20000
	toks := make([]token, n)
	for i := range n {
		toks[i] = tr.add(string(rune('a' + i%26)))
	}
	// Finish in reverse: nothing may pass until the first is done.
	for i := n - 1; i >= 1; i-- {
		tr.done([]token{toks[i]})
	}
	if tr.pending() != n {
		t.Fatalf("pending %d, want %d", tr.pending(), n)
	}
	tr.done(toks[:1])
	if tr.pending() != 0 {
		t.Fatalf("pending %d after all done", tr.pending())
	}
}

func TestTrackerWaitBelowUnblocksOnProgress(t *testing.T) {
	tr := newTracker("0")
	a := tr.add("1")
	tr.add("2")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go func() { time.Sleep(10 * time.Millisecond); tr.done([]token{a}) }()
	if err := tr.waitBelow(ctx, 2); err != nil {
		t.Fatalf("waitBelow: %v", err)
	}
}

func TestBackoffGrowsWithinBounds(t *testing.T) {
	for attempt := 1; attempt < 40; attempt++ {
		d := retry.Backoff(attempt, time.Second, time.Minute)
		want := time.Second << min(attempt-1, 6)
		if want > time.Minute {
			want = time.Minute
		}
		if d < want/2 || d > want {
			t.Fatalf("attempt %d: %v outside [%v, %v]", attempt, d, want/2, want)
		}
	}
}

func TestQueueDoneCompletesChangesTheRunAlreadyRead(t *testing.T) {
	q := newQueue()
	q.add("a", nil, 0) // a scan: no feed change
	w, _ := q.get()
	// The feed delivers the revision the run is reading, then a newer one.
	q.add("a", []byte("gen2"), 2, token{n: 1, rev: 2})
	covered := q.done(w.id, nil, 2)
	if len(covered) != 1 || covered[0].n != 1 {
		t.Fatalf("covered %v, want the change of generation 2", covered)
	}
	if q.len() != 0 {
		t.Fatal("re-queued for a change the run had already read")
	}

	// A change newer than what the run read queues the id again.
	q.add("a", nil, 0)
	w, _ = q.get()
	q.add("a", []byte("gen3"), 3, token{n: 2, rev: 3})
	if covered := q.done(w.id, nil, 2); len(covered) != 0 || q.len() != 1 {
		t.Fatalf("newer change: covered %v, queued %d", covered, q.len())
	}
	w, _ = q.get()
	if len(w.tokens) != 1 || string(w.hint) != "gen3" {
		t.Fatalf("next run lacks the newer change: %+v", w)
	}

	// A plain add while running (a timer) asks for another look anyway.
	q.add("a", nil, 0, token{n: 3, rev: 3})
	q.add("a", nil, 0)
	if covered := q.done(w.id, nil, 3); len(covered) != 0 || q.len() != 1 {
		t.Fatalf("timer during a run: covered %v, queued %d", covered, q.len())
	}
}
