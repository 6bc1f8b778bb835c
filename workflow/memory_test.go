package workflow_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// A burst of documents whose bodies together are many times the byte
// budget: the engine never holds more than the budget, and every document
// is handled.
func TestByteBudgetBoundsPendingBodies(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	const n, budget = 60, 32 << 10
	release := make(chan struct{})
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			// Held until the feed has delivered every body: the bodies
			// pile up in the engine unless it bounds them.
			select {
			case <-release:
			case <-ctx.Done():
				return workflow.Result{}, ctx.Err()
			}
			runs.inc(doc.ID)
			return workflow.Transition("done"), nil
		})})
	opts := workflowtest.Options(t)
	opts.Workers = 4
	opts.MaxDocBytes = 8 << 10
	opts.MaxPendingBytes = budget
	eng := workflowtest.Start(t, db, reg, opts)
	putDocs(t, db, "job", n, "job", "new", map[string]any{"pad": strings.Repeat("x", 6<<10)}) // 60 × 6 KiB: 11 budgets
	workflowtest.Eventually(t, 30*time.Second, "every change received", func() (bool, string) {
		s := eng.Stats()
		return s.ChangesReceived >= n, fmt.Sprintf("%+v", s)
	})
	close(release)
	workflowtest.Eventually(t, 60*time.Second, "every document done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n, fmt.Sprint(st)
	})
	s := eng.Stats()
	if s.PendingBytesPeak > budget {
		t.Errorf("held %d document bytes at the peak, budget %d", s.PendingBytesPeak, budget)
	}
	if s.PendingBytesPeak < 6<<10 {
		t.Errorf("peak %d: not even one document was counted", s.PendingBytesPeak)
	}
	if s.Oversized != 0 {
		t.Errorf("%d documents refused as oversized", s.Oversized)
	}
	eng.Stop(t)
	if s := eng.Stats(); s.PendingBytes != 0 {
		t.Errorf("%d bytes still counted after the engine stopped", s.PendingBytes)
	}
}

// A document over MaxDocBytes is refused without a handler run and without
// a write, its change passes the checkpoint, and it is handled once an edit
// brings it under the limit. Found by the start scan (a read) and by the
// feed (a stripped body) alike.
func TestOversizedDocumentIsRefusedAndKept(t *testing.T) {
	client := couchtest.Client(t)
	db := couchtest.NewDB(t, client)
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(runs, "done")})
	big := map[string]any{"pad": strings.Repeat("é", 4<<10)} // 8 KiB of JSON
	putDocs(t, db, "before", 1, "job", "new", big)
	opts := workflowtest.Options(t)
	opts.MaxDocBytes = 4 << 10
	eng := workflowtest.Start(t, db, reg, opts)
	putDocs(t, db, "after", 1, "job", "new", big)
	putDocs(t, db, "small", 1, "job", "new", nil)
	workflowtest.Eventually(t, 30*time.Second, "small document done, every change finished", func() (bool, string) {
		s := eng.Stats()
		// Each is refused by the feed; "before" also by the start
		// scan's read, and "after" too if it came before the scan.
		return runs.get("small-00000") == 1 && s.Oversized >= 3 && s.Pending == 0 && s.Queued == 0 && s.Inflight == 0,
			fmt.Sprintf("%+v", s)
	})
	refused := eng.Stats().Oversized
	for _, id := range []string{"before-00000", "after-00000"} {
		if runs.get(id) != 0 {
			t.Errorf("%s: handler ran on a document over the limit", id)
		}
		d := get(t, db, id)
		if !strings.HasPrefix(d.Rev, "1-") || d.MetaRaw != nil || d.State != "new" {
			t.Errorf("%s was written: rev %s, state %v, docstate %s", id, d.Rev, d.State, d.MetaRaw)
		}
	}
	time.Sleep(3 * opts.ResyncInterval)
	if s := eng.Stats(); s.Oversized != refused {
		t.Errorf("refused %d times, then %d: nothing but an edit brings a refused document back", refused, s.Oversized)
	}

	// Shrunk by an edit, it is handled.
	d := get(t, db, "after-00000")
	if _, err := db.Put(context.Background(), d.ID, map[string]any{"_rev": d.Rev, "type": "job", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 30*time.Second, "shrunk document done", func() (bool, string) {
		return runs.get("after-00000") == 1, fmt.Sprintf("%+v", eng.Stats())
	})
}
