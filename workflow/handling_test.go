package workflow_test

// How one engine handles what documents and handlers do: malformed
// documents, failures and retries, wake-ups, unsafe merges, the run hook.
// engine_test.go has the engine-wide tests (checkpoint, several engines,
// kills, server restarts, re-created databases).

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func TestMalformedDocumentsNeverStopTheEngine(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(runs, "done")})
	big := strings.Repeat("x", 1<<20)
	docs := map[string]map[string]any{
		"no-type":       {"state": "new"},
		"type-number":   {"type": 12, "state": "new"},
		"type-array":    {"type": []string{"job"}, "state": "new"},
		"state-number":  {"type": "job", "state": 3},
		"state-array":   {"type": "job", "state": []any{"new"}},
		"state-missing": {"type": "job"},
		"unknown-state": {"type": "job", "state": "mystery"},
		"meta-corrupt":  {"type": "job", "state": "new", "docstate": "not an object"},
		"big":           {"type": "job", "state": "new", "blob": big},
		"ok":            {"type": "job", "state": "new"},
	}
	ctx := context.Background()
	for id, d := range docs {
		if _, err := db.Put(ctx, id, d); err != nil {
			t.Fatalf("put %s: %v", id, err)
		}
	}
	opts := workflowtest.Options(t)
	opts.MaxDocBytes = 2 << 20 // "big" is just over the default 1 MiB; a document under the limit is handled whatever its size
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 30*time.Second, "valid docs done", func() (bool, string) {
		return get(t, db, "ok").State == "done" && get(t, db, "big").State == "done", ""
	})
	workflowtest.Eventually(t, 10*time.Second, "invalid reasons recorded", func() (bool, string) {
		for id, want := range map[string]string{
			"state-number":  "state must be a string, got a number",
			"state-array":   "state must be a string, got an array",
			"state-missing": "no state field",
		} {
			d := get(t, db, id)
			if d.Meta == nil || d.Meta.Invalid != want {
				return false, fmt.Sprintf("%s: %s", id, mustJSON(d.Meta))
			}
		}
		return true, ""
	})
	if got := get(t, db, "big").Fields["blob"]; got != big {
		t.Fatal("1 MB field lost")
	}
	for _, id := range []string{"no-type", "type-number", "type-array", "unknown-state", "meta-corrupt"} {
		d := get(t, db, id)
		if !strings.HasPrefix(d.Rev, "1-") {
			t.Errorf("%s was written (rev %s); foreign and unreadable docs must be left alone", id, d.Rev)
		}
	}
	if got := runs.get("meta-corrupt"); got != 0 {
		t.Fatalf("doc with corrupt engine metadata was handled %d times", got)
	}
	// Recording the reason once must not loop on the engine's own write.
	time.Sleep(time.Second)
	if d := get(t, db, "state-number"); !strings.HasPrefix(d.Rev, "2-") {
		t.Fatalf("invalid doc rewritten: rev %s", d.Rev)
	}
	// A fixed document is picked up again.
	d := get(t, db, "state-number")
	d.Fields["state"] = "new"
	if _, err := db.Put(ctx, "state-number", d.Fields); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 10*time.Second, "fixed doc done", func() (bool, string) {
		d := get(t, db, "state-number")
		return d.State == "done" && d.Meta != nil && d.Meta.Invalid == "", mustJSON(d.Fields)
	})
	if s := eng.Stats(); s.Invalid < 3 || s.Skipped < 3 {
		t.Fatalf("stats do not show the skipped and invalid docs: %+v", s)
	}
}

func TestRetriesBackoffAndErrorState(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	reg := workflow.NewRegistry()
	flaky := newCounter()
	reg.MustRegister(workflow.Spec{Type: "flaky", State: "new", Mode: workflow.Safe, MaxAttempts: 5,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			if flaky.inc(doc.ID) < 3 {
				return workflow.Result{}, errors.New("temporarily broken")
			}
			return workflow.Transition("done").Set("attempt", doc.Attempt).Set("last_error", doc.LastError), nil
		})})
	reg.MustRegister(workflow.Spec{Type: "broken", State: "new", Mode: workflow.Unsafe, MaxAttempts: 3,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Result{}, errors.New("always broken")
		})})
	reg.MustRegister(workflow.Spec{Type: "terminal", State: "new", Mode: workflow.Safe, ErrorState: "rejected",
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Result{}, workflow.Terminal(errors.New("bad input"))
		})})
	reg.MustRegister(workflow.Spec{Type: "panics", State: "new", Mode: workflow.Safe, MaxAttempts: 2,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			panic("boom")
		})})
	reg.MustRegister(workflow.Spec{Type: "slow", State: "new", Mode: workflow.Safe, MaxAttempts: 1, Timeout: 100 * time.Millisecond,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			<-ctx.Done()
			return workflow.Result{}, ctx.Err()
		})})
	reg.MustRegister(workflow.Spec{Type: "badresult", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Transition("done").Set("_id", "other"), nil
		})})
	ctx := context.Background()
	for _, typ := range []string{"flaky", "broken", "terminal", "panics", "slow", "badresult"} {
		if _, err := db.Put(ctx, typ, map[string]any{"type": typ, "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 30*time.Second, "all terminal", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 1 && st["error"] == 4 && st["rejected"] == 1, fmt.Sprint(st)
	})
	f := get(t, db, "flaky")
	if f.Fields["attempt"] != 3.0 || f.Fields["last_error"] != "temporarily broken" || f.Meta.Attempts != 0 {
		t.Errorf("flaky: %s", mustJSON(f.Fields))
	}
	for id, want := range map[string]string{
		"broken":    "always broken",
		"terminal":  "bad input",
		"panics":    "handler panicked: boom",
		"slow":      "handler timed out after 100ms",
		"badresult": "reserved or empty field \"_id\"",
	} {
		d := get(t, db, id)
		if d.Meta == nil || d.Meta.Error == nil || !strings.Contains(d.Meta.Error.Reason, want) || d.Meta.Error.From != "new" {
			t.Errorf("%s: want reason containing %q, got %s", id, want, mustJSON(d.Meta))
		}
	}
	if b := get(t, db, "broken"); b.Meta.Error.Attempts != 3 {
		t.Errorf("broken: %d attempts recorded, want 3", b.Meta.Error.Attempts)
	}
}

func TestWakeAtRunsAgainWithoutAChangeAndStayDoesNotLoop(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "timer", State: "waiting", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			var until time.Time
			if _, err := doc.Field("until", &until); err != nil {
				return workflow.Result{}, workflow.Terminal(err)
			}
			runs.inc(doc.ID)
			if time.Now().Before(until) {
				return workflow.Stay().Set("checked", true).WakeAt(until), nil
			}
			return workflow.Transition("expired"), nil
		})})
	if _, err := db.Put(context.Background(), "t1", map[string]any{
		"type": "timer", "state": "waiting", "until": time.Now().Add(1500 * time.Millisecond),
	}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 20*time.Second, "timer expired", func() (bool, string) {
		d := get(t, db, "t1")
		return d.State == "expired", mustJSON(d.Fields)
	})
	if n := runs.get("t1"); n != 2 {
		t.Fatalf("timer handler ran %d times, want 2 (first look, wake-up): a stay must not re-trigger itself", n)
	}
}

func TestUnsafeMergeKeepsFieldsWrittenDuringTheRun(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	entered := make(chan struct{}, 10)
	release := make(chan struct{}, 1)
	var first atomic.Bool
	first.Store(true)
	checked := newCounter()
	reg := workflow.NewRegistry()
	// Like a confirmation check: consume the attempt, record what was checked.
	reg.MustRegister(workflow.Spec{Type: "box", State: "open", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			var attempt string
			ok, _ := doc.Field("attempt", &attempt)
			if first.CompareAndSwap(true, false) {
				entered <- struct{}{}
				<-release
			}
			if !ok || attempt == "" {
				return workflow.Stay().Set("looked", true), nil
			}
			checked.inc(attempt)
			return workflow.Stay().Unset("attempt").Set("last_checked", attempt), nil
		})})
	if _, err := db.Put(ctx, "b", map[string]any{"type": "box", "state": "open", "attempt": "one"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Start(t, db, reg, workflowtest.Options(t))
	<-entered
	// The device writes a second attempt while the first is being checked.
	d := get(t, db, "b")
	d.Fields["attempt"] = "two"
	if _, err := db.Put(ctx, "b", d.Fields); err != nil {
		t.Fatal(err)
	}
	release <- struct{}{}
	workflowtest.Eventually(t, 20*time.Second, "second attempt checked", func() (bool, string) {
		d := get(t, db, "b")
		_, pending := d.Fields["attempt"]
		return d.Fields["last_checked"] == "two" && !pending, mustJSON(d.Fields)
	})
	if checked.get("one") != 1 || checked.get("two") != 1 {
		t.Fatalf("checks: one=%d two=%d, want each once", checked.get("one"), checked.get("two"))
	}

	// A run that saw no attempt and touches no field of it: an attempt
	// written meanwhile must still be checked, not hidden by the merge.
	first.Store(true)
	if _, err := db.Put(ctx, "c", map[string]any{"type": "box", "state": "open", "attempt": "", "note": 1}); err != nil {
		t.Fatal(err)
	}
	<-entered
	d = get(t, db, "c")
	d.Fields["attempt"] = "three"
	if _, err := db.Put(ctx, "c", d.Fields); err != nil {
		t.Fatal(err)
	}
	release <- struct{}{}
	workflowtest.Eventually(t, 20*time.Second, "attempt written during an unrelated run checked", func() (bool, string) {
		d := get(t, db, "c")
		_, pending := d.Fields["attempt"]
		return d.Fields["last_checked"] == "three" && !pending, mustJSON(d.Fields)
	})
}

func TestOnRunReportsEveryRunWithBoundedLabels(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	reg.MustRegister(workflow.Spec{Type: "bad", State: "new", Mode: workflow.Unsafe, MaxAttempts: 1,
		Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
			return workflow.Result{}, workflow.Terminal(errors.New("no"))
		})})
	var mu sync.Mutex
	seen := map[string]int{}
	opts := workflowtest.Options(t)
	opts.OnRun = func(r workflow.RunInfo) {
		mu.Lock()
		seen[fmt.Sprintf("%s/%s/%s/%s", r.Type, r.State, r.Mode, r.Result)]++
		mu.Unlock()
	}
	putDocs(t, db, "j", 3, "job", "new", nil)
	putDocs(t, db, "b", 1, "bad", "new", nil)
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 20*time.Second, "all runs reported", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return seen["job/new/safe/ok"] >= 3 && seen["bad/new/unsafe/terminal"] == 1, fmt.Sprint(seen)
	})
	workflowtest.Eventually(t, 10*time.Second, "checkpoint and feed times", func() (bool, string) {
		s := eng.Stats()
		return !s.CheckpointSaved.IsZero() && !s.FeedContact.IsZero(), fmt.Sprintf("%+v", s)
	})
}
