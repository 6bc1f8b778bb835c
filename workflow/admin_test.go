package workflow_test

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
		st, err := workflow.Inspect(ctx, db, "docstate", nil)
		return err == nil && st.Pending == 0, fmt.Sprintf("%+v %v", st, err)
	})
	eng.Stop(t)

	var pages int
	st, err := workflow.Inspect(ctx, db, "docstate", func(int) { pages++ })
	if err != nil {
		t.Fatal(err)
	}
	if st.States["job"]["error"] != 3 || st.States["watch"]["open"] != 1 || st.Failed != 3 || st.Invalid != 1 ||
		st.Checkpoint == "" || st.Pending != 0 || st.Docs != 5 || pages == 0 {
		t.Fatalf("status: %+v", st)
	}

	// A dry run names what would run and writes nothing.
	touched, err := workflow.Retry(ctx, db, reg, nil, "job", "error", true)
	if err != nil || len(touched) != 3 || touched[0].To != "new" || touched[0].Handler != "safe" {
		t.Fatalf("dry run: %+v %v", touched, err)
	}
	if st := states(t, db); st["error"] != 3 {
		t.Fatalf("dry run wrote: %v", st)
	}

	// Fixed upstream: retry them all, and one by id on a second pass is a no-op.
	broken.Store(false)
	eng = workflowtest.Start(t, db, reg, workflowtest.Options(t))
	if touched, err = workflow.Retry(ctx, db, reg, nil, "job", "error", false); err != nil || len(touched) != 3 {
		t.Fatalf("retry: %+v %v", touched, err)
	}
	workflowtest.Eventually(t, 20*time.Second, "retried jobs done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == 3, fmt.Sprint(st)
	})
	if touched, err = workflow.Retry(ctx, db, reg, []string{"job-00000"}, "", "", false); err != nil || len(touched) != 0 {
		t.Fatalf("retry of a doc not in error: %+v %v", touched, err)
	}

	// Replay runs the settled unsafe handler again, once.
	if touched, err = workflow.Replay(ctx, db, reg, []string{"w-00000"}, "", "", false); err != nil || len(touched) != 1 || touched[0].Handler != "unsafe" {
		t.Fatalf("replay: %+v %v", touched, err)
	}
	workflowtest.Eventually(t, 20*time.Second, "replayed", func() (bool, string) {
		return looks.get("w-00000") == 2, fmt.Sprint(looks.get("w-00000"))
	})
	time.Sleep(500 * time.Millisecond)
	if n := looks.get("w-00000"); n != 2 {
		t.Fatalf("replayed doc ran %d times, want 2", n)
	}
	if _, err := workflow.Retry(ctx, db, reg, nil, "", "", false); err == nil || !strings.Contains(err.Error(), "give document ids") {
		t.Fatalf("retry without a selection: %v", err)
	}
}
