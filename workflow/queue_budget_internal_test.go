package workflow

import (
	"testing"

	"github.com/docstate/docstate/workflow/internal/budget"
)

func TestQueueGivesHintBytesBack(t *testing.T) {
	b := budget.New(1000)
	q := newQueue()
	q.budget = b
	hint := func(n int) []byte {
		if !b.TryHint(int64(n)) {
			t.Fatalf("hint of %d refused", n)
		}
		return make([]byte, n)
	}
	q.add("a", hint(10), 1)
	q.add("a", hint(20), 2) // replaces the older hint
	q.add("a", hint(30), 1) // older than the one held: dropped
	if held, _ := b.Stats(); held != 20 {
		t.Fatalf("held %d after replacing hints, want 20", held)
	}
	w, _ := q.get()
	if len(w.hint) != 20 || b.Hinted() != 0 {
		t.Fatalf("work hint %d bytes, %d still counted as hints", len(w.hint), b.Hinted())
	}
	q.add("a", hint(40), 3) // arrives while the run holds the other
	b.Release(20)           // the run ends
	q.done("a", nil, 3)     // and covered generation 3
	q.add("b", hint(50), 1)
	q.dropHints()
	if held, _ := b.Stats(); held != 0 || b.Hinted() != 0 {
		t.Fatalf("held %d, hinted %d after the queue dropped everything", held, b.Hinted())
	}
}
