package workflow_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// Two engines that see each other split the documents: each runs some,
// none runs twice, and every document is handled.
func TestMembersSplitDocumentsWithoutOverlap(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	runs := newCounter()
	var byA, byB atomic.Int64
	reg := func(n *atomic.Int64) *workflow.Registry {
		r := workflow.NewRegistry()
		r.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
			Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
				runs.inc(doc.ID)
				n.Add(1)
				return workflow.Transition("done"), nil
			})})
		return r
	}
	opts := workflowtest.Options(t)
	opts.Members = true
	opts.MemberLease = 2 * time.Second
	optsA, optsB := opts, opts
	optsA.Owner, optsB.Owner = "member-a", "member-b"
	a := workflowtest.Start(t, db, reg(&byA), optsA)
	b := workflowtest.Start(t, db, reg(&byB), optsB)
	workflowtest.Eventually(t, 10*time.Second, "both see two members", func() (bool, string) {
		return a.Stats().Members == 2 && b.Stats().Members == 2, fmt.Sprintf("a=%d b=%d", a.Stats().Members, b.Stats().Members)
	})
	const n = 200
	putDocs(t, db, "j", n, "job", "new", nil)
	workflowtest.Eventually(t, time.Minute, "all done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n, fmt.Sprint(st)
	})
	if runs.total() != n {
		t.Fatalf("%d runs for %d documents: members overlapped", runs.total(), n)
	}
	// Rendezvous hashing of 200 ids between two members: each gets a
	// share far from none (binomial, p=0.5: below 60 is a 1e-8 event).
	if byA.Load() < 60 || byB.Load() < 60 {
		t.Fatalf("split a=%d b=%d, want both near half", byA.Load(), byB.Load())
	}
	if a.Stats().SkippedOther == 0 || b.Stats().SkippedOther == 0 {
		t.Fatalf("skipped a=%d b=%d, want each to pass over the other's", a.Stats().SkippedOther, b.Stats().SkippedOther)
	}

	// A graceful stop hands the stopped member's share over at once, not
	// after its lease: new documents are all handled by the one left.
	b.Stop(t)
	workflowtest.Eventually(t, 5*time.Second, "a alone", func() (bool, string) {
		return a.Stats().Members == 1, fmt.Sprint(a.Stats().Members)
	})
	putDocs(t, db, "k", 50, "job", "new", nil)
	workflowtest.Eventually(t, 30*time.Second, "all done by a", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n+50, fmt.Sprint(st)
	})
}

// A member that dies keeps its share until its lease runs out; then the
// live members rescan and handle every document it left.
func TestDeadMembersShareIsTakenOverAfterItsLease(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Unsafe, Handler: oneStep(runs, "done")})
	opts := workflowtest.Options(t)
	opts.Members = true
	opts.MemberLease = time.Second
	opts.Owner = "member-live"
	// A member that stopped renewing: its lease runs out in 3s.
	ghostExpires := time.Now().Add(3 * time.Second).UTC()
	if _, err := db.Put(ctx, "docstate-member:docstate:member-ghost", map[string]any{
		"type": "docstate-member", "engine": "docstate", "owner": "member-ghost",
		"expires": ghostExpires.Format(time.RFC3339Nano), "joined": time.Now().UTC().Format(time.RFC3339Nano),
	}); err != nil {
		t.Fatal(err)
	}
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 5*time.Second, "ghost seen", func() (bool, string) {
		return eng.Stats().Members == 2, fmt.Sprint(eng.Stats().Members)
	})
	const n = 100
	putDocs(t, db, "j", n, "job", "new", nil)
	workflowtest.Eventually(t, 10*time.Second, "the live member's share done", func() (bool, string) {
		st := states(t, db)
		return st["done"] > 0 && st["done"]+int(eng.Stats().SkippedOther) >= n, fmt.Sprint(st, eng.Stats().SkippedOther)
	})
	if time.Now().Before(ghostExpires) {
		if st := states(t, db); st["done"] == n {
			t.Fatalf("all %d done while the ghost's lease was live: its share was not skipped", n)
		}
	}
	workflowtest.Eventually(t, 20*time.Second, "the ghost's share taken over", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n, fmt.Sprint(st)
	})
	if time.Now().Before(ghostExpires) {
		t.Fatal("the ghost's share was taken over before its lease ran out")
	}
	if runs.total() != n {
		t.Fatalf("%d runs for %d documents", runs.total(), n)
	}
	if eng.Stats().Rebalances < 2 {
		t.Fatalf("rebalances %d, want the ghost's arrival and departure", eng.Stats().Rebalances)
	}
}
