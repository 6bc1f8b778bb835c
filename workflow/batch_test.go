package workflow_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// A validation function that refuses one document makes its row of a
// _bulk_docs request fail while the rest of the batch is written: the
// refused document goes to the error state with the server's reason, the
// others move on, and nothing is retried forever.
func TestGroupCommitRejectedRowFailsOnlyItsDocument(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ddoc := map[string]any{"validate_doc_update": `function (doc) {
		if (doc.state === "done" && doc.refuse) { throw({forbidden: "refused by the test's validation function"}); }
	}`}
	if _, err := db.Put(context.Background(), "_design/refuse", ddoc); err != nil {
		t.Fatal(err)
	}
	const n = 60
	putDocs(t, db, "ok", n, "job", "new", nil)
	putDocs(t, db, "bad", 3, "job", "new", map[string]any{"refuse": true})
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Transition("done"), nil
		})})
	opts := workflowtest.Options(t)
	opts.BatchLinger = 50 * time.Millisecond // gather the refused docs into the big batches
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 60*time.Second, "all settled", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n && st["error"] == 3, fmt.Sprint(st)
	})
	for i := range 3 {
		d := get(t, db, fmt.Sprintf("bad-%05d", i))
		if d.Meta == nil || d.Meta.Error == nil || d.Meta.Error.Reason == "" {
			t.Fatalf("%s: no error recorded: %+v", d.ID, d.Fields)
		}
		t.Logf("%s: %s", d.ID, d.Meta.Error.Reason)
	}
	s := eng.Stats()
	if s.Batches == 0 || s.BatchedWrites < n {
		t.Fatalf("group commit not used: %d batches, %d writes", s.Batches, s.BatchedWrites)
	}
	t.Logf("%d writes in %d batches (%.1f a batch)", s.BatchedWrites, s.Batches, float64(s.BatchedWrites)/float64(s.Batches))
}

// Two engines, one with group commit and one without, race over the same
// unsafe documents: each runs exactly once, and every claim lost in a batch
// was lost exactly as a single PUT would have lost it.
func TestGroupCommitRacingEnginesRunUnsafeOnce(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	execs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			execs.inc(doc.ID)
			return workflow.Transition("sent").Set("key", doc.Claim.Key), nil
		})})
	const n = 400
	ids := putDocs(t, db, "mail", n, "mail", "new", nil)
	var engines []*workflowtest.Running
	for _, batch := range []int{0, 0, 1} { // two batched engines, one single-PUT engine
		opts := workflowtest.Options(t)
		opts.BatchSize = batch
		engines = append(engines, workflowtest.Start(t, db, reg, opts))
	}
	workflowtest.Eventually(t, 90*time.Second, "all sent", func() (bool, string) {
		st := states(t, db)
		return st["sent"] == n, fmt.Sprint(st)
	})
	for _, id := range ids {
		if c := execs.get(id); c != 1 {
			t.Errorf("%s executed %d times", id, c)
		}
	}
	var won, lost, batches, writes int64
	for _, e := range engines {
		s := e.Stats()
		won, lost, batches, writes = won+s.ClaimsWon, lost+s.ClaimsLost, batches+s.Batches, writes+s.BatchedWrites
	}
	t.Logf("%d unsafe docs, 3 engines: claims won %d, lost %d; %d writes in %d batches", n, won, lost, writes, batches)
	if won != n {
		t.Fatalf("claims won %d, want %d", won, n)
	}
	if s := engines[2].Stats(); s.Batches != 0 {
		t.Fatalf("batch size 1 sent %d batches", s.Batches)
	}
}
