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

// With one handler slot busy, the next unsafe document is claimed ahead of
// its slot (so claims share group commits), its lease is kept alive while it
// waits, and a stop gives the claim back unrun: the next engine runs it as
// its first attempt, without waiting out a lease.
func TestClaimsAheadOfSlotsAreRenewedAndReleasedOnStop(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	runs := newCounter()
	hold := make(chan struct{})
	entered := make(chan string, 4)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			runs.inc(doc.ID)
			entered <- doc.ID
			if doc.ID == "a" {
				select {
				case <-hold:
				case <-ctx.Done():
					return workflow.Result{}, ctx.Err()
				}
			}
			return workflow.Transition("sent"), nil
		})})
	if _, err := db.Put(ctx, "a", map[string]any{"type": "mail", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	opts := workflowtest.Options(t)
	opts.Workers = 1
	opts.HandlerTimeout = 4 * time.Second
	opts.Lease = 5 * time.Second
	opts.DrainTimeout = 10 * time.Second
	eng := workflowtest.Start(t, db, reg, opts)
	if id := <-entered; id != "a" {
		t.Fatalf("first run %s, want a", id)
	}
	// a holds the only slot; b is claimed anyway.
	if _, err := db.Put(ctx, "b", map[string]any{"type": "mail", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	var firstExpiry time.Time
	workflowtest.Eventually(t, 10*time.Second, "b claimed while a runs", func() (bool, string) {
		d := get(t, db, "b")
		if d.Meta == nil || d.Meta.Claim == nil {
			return false, mustJSON(d.Fields)
		}
		firstExpiry = d.Meta.Claim.Expires.Time
		return eng.Stats().ClaimsWaiting == 1, fmt.Sprintf("%+v", eng.Stats())
	})
	// Past half the lease, the waiting claim is renewed, never let run out.
	workflowtest.Eventually(t, 10*time.Second, "b's lease renewed while it waits", func() (bool, string) {
		d := get(t, db, "b")
		return d.Meta != nil && d.Meta.Claim != nil && d.Meta.Claim.Expires.After(firstExpiry) &&
			eng.Stats().ClaimsRenewed >= 1, mustJSON(d.Fields)
	})
	if runs.get("b") != 0 {
		t.Fatal("b ran while a held the only slot")
	}

	// Stop while a still runs: a finishes within the drain, b is given back.
	stopped := make(chan struct{})
	go func() { eng.Stop(t); close(stopped) }()
	workflowtest.Eventually(t, 10*time.Second, "b's claim released", func() (bool, string) {
		d := get(t, db, "b")
		return d.Meta == nil || (d.Meta.Claim == nil && d.Meta.Claims == 0), mustJSON(d.Fields)
	})
	close(hold)
	<-stopped
	if s := eng.Stats(); s.ClaimsReleased != 1 || s.ClaimsWaiting != 0 {
		t.Fatalf("released %d waiting %d, want 1 and 0", s.ClaimsReleased, s.ClaimsWaiting)
	}
	if d := get(t, db, "a"); d.State != "sent" {
		t.Fatalf("a is %v after the drain, want sent", d.State)
	}

	// The next engine runs b at once, as its first attempt.
	began := time.Now()
	workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, opts.Lease, "b sent by the next engine", func() (bool, string) {
		d := get(t, db, "b")
		return d.State == "sent", mustJSON(d.Fields)
	})
	if waited := time.Since(began); waited >= opts.Lease {
		t.Fatalf("b waited %v, a lease or more", waited)
	}
	if runs.get("a") != 1 || runs.get("b") != 1 {
		t.Fatalf("runs a=%d b=%d, want 1 each", runs.get("a"), runs.get("b"))
	}
}

// Many unsafe documents with one handler slot share claim writes: the
// group commit carries many documents a request, not one.
func TestUnsafeClaimsBatchWithOneSlot(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	reg := workflow.NewRegistry()
	runs := newCounter()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Unsafe, Handler: oneStep(runs, "done")})
	const n = 400
	putDocs(t, db, "j", n, "job", "new", nil)
	opts := workflowtest.Options(t)
	opts.Workers = 1
	opts.NoStartScan = true
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, time.Minute, "all done", func() (bool, string) {
		return eng.Stats().Transitions >= n, fmt.Sprintf("%+v", eng.Stats())
	})
	s := eng.Stats()
	// Two writes per document (claim and result); one slot used to mean
	// about one write per request.
	if perBatch := float64(s.BatchedWrites) / float64(s.Batches); perBatch < 4 {
		t.Fatalf("%.1f writes per group commit (%d in %d), want claims and results batched", perBatch, s.BatchedWrites, s.Batches)
	}
	if runs.total() != n {
		t.Fatalf("%d runs, want %d", runs.total(), n)
	}
}

// FailExpired handlers are not claimed ahead: a crash must not strand a
// claim whose handler never started, since its expiry sends the document
// to the error state. With the only slot busy, the next document waits
// unclaimed.
func TestFailExpiredHandlersAreNotClaimedAhead(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	hold := make(chan struct{})
	entered := make(chan string, 4)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "pay", State: "new", Mode: workflow.Unsafe, OnExpired: workflow.FailExpired,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			entered <- doc.ID
			if doc.ID == "a" {
				select {
				case <-hold:
				case <-ctx.Done():
					return workflow.Result{}, ctx.Err()
				}
			}
			return workflow.Transition("paid"), nil
		})})
	if _, err := db.Put(ctx, "a", map[string]any{"type": "pay", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	opts := workflowtest.Options(t)
	opts.Workers = 1
	eng := workflowtest.Start(t, db, reg, opts)
	<-entered
	if _, err := db.Put(ctx, "b", map[string]any{"type": "pay", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if d := get(t, db, "b"); d.Meta != nil && d.Meta.Claim != nil {
		t.Fatalf("b claimed while the only slot was busy: %s", mustJSON(d.Fields))
	}
	if eng.Stats().ClaimsWaiting != 0 {
		t.Fatalf("%d claims waiting, want 0", eng.Stats().ClaimsWaiting)
	}
	close(hold)
	workflowtest.Eventually(t, 10*time.Second, "both paid", func() (bool, string) {
		return get(t, db, "a").State == "paid" && get(t, db, "b").State == "paid", ""
	})
}
