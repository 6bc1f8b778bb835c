package workflow

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
)

// One _bulk_docs request carries writes with current and with stale _revs:
// each writer gets its own row's answer, exactly as a single PUT would have
// answered it — a new rev for the current ones, 409 for the stale ones —
// even though PouchDB Server answers rows out of request order.
func TestBatcherMixedOutcomesInOneRequest(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	const n = 40
	revs := make([]string, n)
	for i := range n {
		rev, err := db.Put(ctx, fmt.Sprintf("d%02d", i), map[string]any{"v": 0})
		if err != nil {
			t.Fatal(err)
		}
		revs[i] = rev
		if i%2 == 1 { // someone else moves the odd ones on
			if _, err := db.Put(ctx, fmt.Sprintf("d%02d", i), map[string]any{"_rev": rev, "v": "other"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	var flushes []FlushInfo
	var mu sync.Mutex
	// busy says n runs are in progress, so the batch waits for all n.
	b := newBatcher(db, 100, time.Minute, func() int64 { return n }, func(f FlushInfo) {
		mu.Lock()
		defer mu.Unlock()
		flushes = append(flushes, f)
	})
	stop := make(chan struct{})
	var runner sync.WaitGroup
	runner.Go(func() { b.run(ctx, stop) })

	type answer struct {
		rev string
		err error
	}
	answers := make([]answer, n)
	var writers sync.WaitGroup
	for i := range n {
		writers.Go(func() {
			id := fmt.Sprintf("d%02d", i)
			rev, err := b.put(ctx, id, map[string]any{"_id": id, "_rev": revs[i], "v": i})
			answers[i] = answer{rev, err}
		})
	}
	writers.Wait()
	close(stop)
	runner.Wait()

	if len(flushes) != 1 || flushes[0].Docs != n || flushes[0].Conflicts != n/2 {
		t.Fatalf("flushes %+v, want one of %d docs with %d conflicts", flushes, n, n/2)
	}
	for i, a := range answers {
		id := fmt.Sprintf("d%02d", i)
		var doc struct {
			Rev string `json:"_rev"`
			V   any    `json:"v"`
		}
		if err := db.Get(ctx, id).ScanDoc(&doc); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			if !couch.IsConflict(a.err) || doc.V != "other" {
				t.Errorf("%s: stale write answered %+v, stored %v; want 409 and the other writer's value", id, a, doc.V)
			}
			continue
		}
		if a.err != nil || a.rev != doc.Rev || doc.V != float64(i) {
			t.Errorf("%s: answered %+v, stored rev %s value %v", id, a, doc.Rev, doc.V)
		}
	}
}

// A request the server cannot be reached for answers every writer with the
// transient error, so each repeats its run; nothing is reported written.
func TestBatcherUnreachableServerFailsEveryWriter(t *testing.T) {
	opts := couchtest.Options(t)
	opts.URL = "http://127.0.0.1:1" // nothing listens on port 1
	client, err := couch.NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	db := client.DB("nowhere")
	ctx := context.Background()
	b := newBatcher(db, 10, time.Millisecond, func() int64 { return 3 }, nil)
	stop := make(chan struct{})
	var runner sync.WaitGroup
	runner.Go(func() { b.run(ctx, stop) })
	var writers sync.WaitGroup
	for i := range 3 {
		writers.Go(func() {
			_, err := b.put(ctx, fmt.Sprint(i), map[string]any{"_id": fmt.Sprint(i)})
			if classify(err) != writeTransient {
				t.Errorf("writer %d: %v classified %v, want transient", i, err, classify(err))
			}
		})
	}
	writers.Wait()
	close(stop)
	runner.Wait()
}
