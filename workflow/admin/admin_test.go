package admin_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/admin"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func TestStatusRetryAndReplay(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	var broken atomic.Bool
	broken.Store(true)
	looks := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			if broken.Load() {
				return workflow.Result{}, workflow.Terminal(errors.New("upstream rejected it"))
			}
			return workflow.Transition("done"), nil
		})})
	reg.MustRegister(workflow.Spec{Type: "watch", State: "open", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			looks.inc(doc.ID)
			return workflow.Stay().Set("looked", true), nil
		})})
	putDocs(t, db, "job", 3, "job", "new", nil)
	putDocs(t, db, "w", 1, "watch", "open", nil)
	if _, err := db.Put(ctx, "odd", map[string]any{"type": "job", "state": 5}); err != nil {
		t.Fatal(err)
	}
	eng := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 20*time.Second, "jobs failed, watch settled", func() (bool, string) {
		st := states(t, db)
		return st["error"] == 3 && looks.get("w-00000") == 1, fmt.Sprint(st)
	})
	workflowtest.Eventually(t, 10*time.Second, "saved checkpoint caught up", func() (bool, string) {
		st, err := admin.Inspect(ctx, db, "docstate", nil)
		return err == nil && st.Pending == 0, fmt.Sprintf("%+v %v", st, err)
	})
	eng.Stop(t)

	var pages int
	st, err := admin.Inspect(ctx, db, "docstate", func(int) { pages++ })
	if err != nil {
		t.Fatal(err)
	}
	if st.States["job"]["error"] != 3 || st.States["watch"]["open"] != 1 || st.Failed != 3 || st.Invalid != 1 ||
		st.Checkpoint == "" || st.Pending != 0 || st.Docs != 5 || pages == 0 {
		t.Fatalf("status: %+v", st)
	}

	// A dry run names what would run and writes nothing.
	rep, err := admin.Retry(ctx, db, reg, admin.Selection{Type: "job", State: "error", DryRun: true})
	touched := rep.Touched
	if err != nil || len(touched) != 3 || touched[0].To != "new" || touched[0].Handler != "safe" {
		t.Fatalf("dry run: %+v %v", rep, err)
	}
	if st := states(t, db); st["error"] != 3 {
		t.Fatalf("dry run wrote: %v", st)
	}

	// Fixed upstream: retry them all, and one by id on a second pass is a no-op.
	broken.Store(false)
	eng = workflowtest.Start(t, db, reg, workflowtest.Options(t))
	if rep, err = admin.Retry(ctx, db, reg, admin.Selection{Type: "job", State: "error"}); err != nil || len(rep.Touched) != 3 {
		t.Fatalf("retry: %+v %v", rep, err)
	}
	workflowtest.Eventually(t, 20*time.Second, "retried jobs done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 3, fmt.Sprint(st)
	})
	if rep, err = admin.Retry(ctx, db, reg, admin.Selection{IDs: []string{"job-00000"}}); err != nil || len(rep.Touched) != 0 ||
		rep.Skipped.NotFailed != 1 {
		t.Fatalf("retry of a doc not in error: %+v %v", rep, err)
	}

	// Replay runs the settled unsafe handler again, once.
	if rep, err = admin.Replay(ctx, db, reg, admin.Selection{IDs: []string{"w-00000"}}); err != nil || len(rep.Touched) != 1 || rep.Touched[0].Handler != "unsafe" {
		t.Fatalf("replay: %+v %v", rep, err)
	}
	workflowtest.Eventually(t, 20*time.Second, "replayed", func() (bool, string) {
		return looks.get("w-00000") == 2, fmt.Sprint(looks.get("w-00000"))
	})
	time.Sleep(500 * time.Millisecond)
	if n := looks.get("w-00000"); n != 2 {
		t.Fatalf("replayed doc ran %d times, want 2", n)
	}
	if _, err := admin.Retry(ctx, db, reg, admin.Selection{}); err == nil || !strings.Contains(err.Error(), "give document ids") {
		t.Fatalf("retry without a selection: %v", err)
	}
}

// TestReplaySkipsWhatIsNotOursAndCarriesOnPastErrors replays everything
// changed since 0 on a database that also holds a design document, a
// document of another application, a state-less one and one whose engine
// metadata is corrupt: the first three are counted as skipped, the corrupt
// one is reported, and every workflow document, before and after it in the
// feed, is written.
func TestReplaySkipsWhatIsNotOursAndCarriesOnPastErrors(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
			return workflow.Stay(), nil
		})})
	put := func(id string, doc map[string]any) {
		t.Helper()
		if _, err := db.Put(ctx, id, doc); err != nil {
			t.Fatal(err)
		}
	}
	put("a-first", map[string]any{"type": "job", "state": "new"})
	put("_design/docstate-devices", map[string]any{"validate_doc_update": "function(){}"})
	put("b-nostate", map[string]any{"type": "job"})
	put("c-corrupt", map[string]any{"type": "job", "state": "new", "docstate": "not an object"})
	put("d-other", map[string]any{"type": "invoice", "state": "open"})
	put("e-untyped", map[string]any{"hello": "world"})
	put("f-last", map[string]any{"type": "job", "state": "new"})
	ids, err := admin.ChangedSince(ctx, db, "0")
	if err != nil {
		t.Fatal(err)
	}
	ids = append(ids, "_local/x", "never-was")

	var calls, total int
	progress := func(done, n int) { calls, total = done, n }
	for _, dry := range []bool{true, false} {
		rep, err := admin.Replay(ctx, db, reg, admin.Selection{IDs: ids, DryRun: dry, Progress: progress})
		if err != nil {
			t.Fatalf("dry %v: %v", dry, err)
		}
		var got []string
		for _, d := range rep.Touched {
			got = append(got, d.ID)
		}
		want := admin.Skipped{Design: 1, Local: 1, Missing: 1, Unregistered: 2, NoState: 1}
		if strings.Join(got, ",") != "a-first,f-last" || rep.Skipped != want || len(rep.Errors) != 1 ||
			rep.Errors[0].ID != "c-corrupt" || rep.DryRun != dry {
			t.Fatalf("dry %v: %+v", dry, rep)
		}
		if calls != len(ids) || total != len(ids) {
			t.Fatalf("progress ended at %d/%d, want %d/%d", calls, total, len(ids), len(ids))
		}
	}
	var last struct {
		Rev string `json:"_rev"`
	}
	if err := db.Get(ctx, "f-last").ScanDoc(&last); err != nil || !strings.HasPrefix(last.Rev, "2-") {
		t.Fatalf("the document after the failed one was not written: %+v %v", last, err)
	}
}
