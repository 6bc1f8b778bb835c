package workflow_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func oneStep(runs *counter, to string) workflow.Handler {
	return workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		runs.inc(doc.ID)
		return workflow.Transition(to).Set("handled_at_attempt", doc.Attempt), nil
	})
}

func TestThousandDocsReachDoneAndCheckpointPreventsReplay(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(runs, "done")})

	ids := putDocs(t, db, "job", 1000, "job", "new", map[string]any{"payload": "x"})
	eng := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 60*time.Second, "1000 docs done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 1000, fmt.Sprint(st)
	})
	workflowtest.Eventually(t, 10*time.Second, "checkpoint caught up", func() (bool, string) {
		s := eng.Stats()
		return s.Pending == 0, fmt.Sprintf("pending %d", s.Pending)
	})
	eng.Stop(t)
	if n := runs.total(); n < 1000 {
		t.Fatalf("%d handler runs for 1000 docs", n)
	}
	d := get(t, db, ids[0])
	if d.Fields["payload"] != "x" || d.Meta == nil || d.Meta.From != "new" {
		t.Fatalf("document lost fields or meta: %s", mustJSON(d.Fields))
	}

	// A second engine from the saved checkpoint dispatches none of them.
	before := runs.total()
	eng2 := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	time.Sleep(1500 * time.Millisecond)
	eng2.Stop(t)
	if after := runs.total(); after != before {
		t.Fatalf("second run dispatched %d handler runs again", after-before)
	}
	if s := eng2.Stats(); s.ChangesReceived != 0 {
		t.Fatalf("second run received %d changes from its checkpoint, want 0", s.ChangesReceived)
	}
}

func TestThreeEnginesRunEachUnsafeDocExactlyOnce(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	execs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			execs.inc(doc.ID)
			if doc.Claim == nil || doc.Claim.Key != doc.ID+"/new/1" {
				return workflow.Result{}, workflow.Terminal(fmt.Errorf("unexpected claim %+v", doc.Claim))
			}
			time.Sleep(2 * time.Millisecond) // a side effect takes time
			return workflow.Transition("sent").Set("message_id", doc.Claim.Key), nil
		})})

	const n = 300
	ids := putDocs(t, db, "mail", n, "mail", "new", nil)
	var engines []*workflowtest.Running
	for range 3 {
		engines = append(engines, workflowtest.Start(t, db, reg, workflowtest.Options(t)))
	}
	workflowtest.Eventually(t, 90*time.Second, "all sent", func() (bool, string) {
		st := states(t, db)
		return st["sent"] == n, fmt.Sprint(st)
	})
	var won, lost, held int64
	for _, e := range engines {
		s := e.Stats()
		won, lost, held = won+s.ClaimsWon, lost+s.ClaimsLost, held+s.ClaimsHeld
	}
	for _, id := range ids {
		if c := execs.get(id); c != 1 {
			t.Errorf("%s executed %d times", id, c)
		}
	}
	t.Logf("3 engines, %d unsafe docs: claims won %d, lost %d, skipped as held %d", n, won, lost, held)
	if won != n {
		t.Fatalf("claims won %d, want %d", won, n)
	}
	if lost == 0 {
		t.Log("no claim race lost in this run (engines did not collide)")
	}
}

func TestKilledEngineLosesNothingAndExpiredClaimsFollowPolicy(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	execs := newCounter()
	block := make(chan struct{})
	var firstRunBlocks atomic.Bool
	firstRunBlocks.Store(true)
	unsafeHandler := workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		execs.inc(doc.ID)
		if firstRunBlocks.Load() {
			select { // the "crash" happens while the side effect runs
			case <-block:
			case <-ctx.Done():
			}
			return workflow.Result{}, ctx.Err()
		}
		return workflow.Transition("done").Set("key", doc.Claim.Key).Set("takeover", doc.Claim.Takeover), nil
	})
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "retry", State: "new", Mode: workflow.Unsafe, Handler: unsafeHandler,
		Timeout: 5 * time.Second, Lease: 8 * time.Second, OnExpired: workflow.RetryExpired})
	reg.MustRegister(workflow.Spec{Type: "failfast", State: "new", Mode: workflow.Unsafe, Handler: unsafeHandler,
		Timeout: 5 * time.Second, Lease: 8 * time.Second, OnExpired: workflow.FailExpired})
	safeRuns := newCounter()
	reg.MustRegister(workflow.Spec{Type: "safe", State: "new", Mode: workflow.Safe, Handler: oneStep(safeRuns, "done")})

	putDocs(t, db, "r", 4, "retry", "new", nil)
	putDocs(t, db, "f", 4, "failfast", "new", nil)
	putDocs(t, db, "s", 200, "safe", "new", nil)

	opts := workflowtest.Options(t)
	opts.DrainTimeout = time.Millisecond // a hard stop: running handlers are cut off
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 30*time.Second, "unsafe docs claimed", func() (bool, string) {
		s := eng.Stats()
		return s.ClaimsWon == 8, fmt.Sprintf("claims %d", s.ClaimsWon)
	})
	eng.Stop(t)

	// The claims are left in the documents, as after a crash.
	for _, id := range []string{"r-00000", "f-00000"} {
		if d := get(t, db, id); d.Meta == nil || d.Meta.Claim == nil {
			t.Fatalf("%s has no claim after the crash: %s", id, mustJSON(d.Fields))
		}
	}
	firstRunBlocks.Store(false)
	eng2 := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 60*time.Second, "every doc terminal", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 204 && st["error"] == 4, fmt.Sprint(st)
	})
	eng2.Stop(t)
	for i := range 4 {
		r := get(t, db, fmt.Sprintf("r-%05d", i))
		if r.Fields["takeover"] != true || r.Fields["key"] != fmt.Sprintf("r-%05d/new/1", i) {
			t.Errorf("retried doc: takeover %v key %v, want a takeover with the first claim's key", r.Fields["takeover"], r.Fields["key"])
		}
		if c := execs.get(r.ID); c != 2 {
			t.Errorf("%s ran %d times, want 2 (crashed run + takeover)", r.ID, c)
		}
		f := get(t, db, fmt.Sprintf("f-%05d", i))
		if f.Meta == nil || f.Meta.Error == nil || !strings.Contains(f.Meta.Error.Reason, "expired") || f.Meta.Error.From != "new" {
			t.Errorf("fail-policy doc: %s", mustJSON(f.Fields))
		}
		if c := execs.get(f.ID); c != 1 {
			t.Errorf("%s ran %d times, want 1 (policy fail)", f.ID, c)
		}
	}
	for _, id := range []string{"r-00000", "f-00000", "s-00000"} {
		if d := get(t, db, id); d.Meta != nil && d.Meta.Claim != nil {
			t.Errorf("%s still claimed: %s", id, mustJSON(d.Meta))
		}
	}
}

func TestEngineSurvivesServerKillAndRestart(t *testing.T) {
	srv := couchtest.StartServer(t, couchtest.ServerOptions{OnDisk: true})
	client := srv.Client(t)
	db := couchtest.NewDB(t, client)
	runs := newCounter()
	var slow atomic.Bool
	slow.Store(true)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			runs.inc(doc.ID)
			if slow.Load() {
				time.Sleep(20 * time.Millisecond)
			}
			return workflow.Transition("done"), nil
		})})
	putDocs(t, db, "job", 300, "job", "new", nil)
	opts := workflowtest.Options(t)
	opts.Workers = 2
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 30*time.Second, "some progress", func() (bool, string) {
		return eng.Stats().Transitions >= 20, ""
	})
	if err := eng.Ready(); err != nil {
		t.Fatalf("not ready while working: %v", err)
	}
	srv.Kill(t)
	workflowtest.Eventually(t, 10*time.Second, "unready while the server is down", func() (bool, string) {
		return eng.Ready() != nil, "still ready"
	})
	slow.Store(false)
	srv.Start(t)
	workflowtest.Eventually(t, 30*time.Second, "ready again", func() (bool, string) {
		err := eng.Ready()
		return err == nil, fmt.Sprint(err)
	})
	workflowtest.Eventually(t, 90*time.Second, "all done after the restart", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 300, fmt.Sprint(st)
	})
	s := eng.Stats()
	if s.FeedErrors == 0 && s.Transient == 0 {
		t.Fatalf("the outage was not noticed: %+v", s)
	}
	t.Logf("after the server restart: feed errors %d, transient runs %d", s.FeedErrors, s.Transient)
}

func TestRecreatedDatabaseStartsOverFromZero(t *testing.T) {
	client := couchtest.Client(t)
	db := couchtest.NewDB(t, client)
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(runs, "done")})
	putDocs(t, db, "a", 50, "job", "new", nil)
	eng := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 30*time.Second, "first batch done", func() (bool, string) {
		return states(t, db)["done"] == 50, ""
	})
	ctx := context.Background()
	if err := client.DestroyDB(ctx, db.Name()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	// PouchDB Server answers 412 after a delete while the engine's open
	// longpoll still holds the old database, whose feed never answers: until
	// the request's deadline (1.5 × feed timeout + 5s) ends it. On a loaded
	// machine the engine's next request can catch the old database again,
	// hence several deadlines' worth of waiting.
	//
	// PouchDB Server may also bring the database back by itself, empty,
	// when the engine, finding it gone, writes its restart checkpoint into
	// it: an empty database under the name is the new database too.
	workflowtest.Eventually(t, 60*time.Second, "database created again", func() (bool, string) {
		err := client.CreateDB(ctx, db.Name())
		if err != nil && !couch.IsPreconditionFailed(err) {
			t.Fatal(err)
		}
		if err != nil {
			if st, statErr := db.Stats(ctx); statErr == nil && st.DocCount == 0 && st.DeletedCount == 0 {
				return true, ""
			}
		}
		return err == nil, fmt.Sprint(err)
	})
	// Fewer docs than before: a feed still at the old seq would wait for
	// them forever.
	putDocs(t, db, "b", 5, "job", "new", nil)
	workflowtest.Eventually(t, 30*time.Second, "docs in the new database done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 5, fmt.Sprint(st, eng.Stats().FeedResets)
	})
	if eng.Stats().FeedResets == 0 {
		t.Fatal("no feed reset counted")
	}
}
