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

// On a large database the due scan goes through a json index on the due
// time, which the engine creates; a wake-up left by an engine that has
// stopped (its timer gone with it) is still found by the next engine's due
// scan, with no feed row and no start scan to bring it. On a small database
// no index is made.
func TestDueScanUsesAnIndexOnLargeDatabases(t *testing.T) {
	for _, tc := range []struct {
		name    string
		filler  int
		indexed bool
	}{{"large", 1200, true}, {"small", 10, false}} {
		t.Run(tc.name, func(t *testing.T) {
			db := couchtest.NewDB(t, couchtest.Client(t))
			ctx := context.Background()
			var filler []any
			for i := range tc.filler {
				filler = append(filler, map[string]any{"_id": fmt.Sprintf("filler-%05d", i), "note": "no workflow"})
			}
			if _, err := db.BulkDocs(ctx, filler); err != nil {
				t.Fatal(err)
			}
			woken := make(chan string, 1)
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					if doc.Has("slept") {
						woken <- doc.ID
						return workflow.Transition("done"), nil
					}
					return workflow.Stay().Set("slept", true).WakeAt(time.Now().Add(1500 * time.Millisecond)), nil
				})})
			opts := workflowtest.Options(t)
			opts.NoStartScan = true
			opts.ResyncInterval = 200 * time.Millisecond
			first := workflowtest.Start(t, db, reg, opts)
			if _, err := db.Put(ctx, "sleeper", map[string]any{"type": "job", "state": "new"}); err != nil {
				t.Fatal(err)
			}
			workflowtest.Eventually(t, 10*time.Second, "asleep", func() (bool, string) {
				d := get(t, db, "sleeper")
				return d.Fields["slept"] != nil, mustJSON(d.Fields)
			})
			// Its checkpoint passes the document before it stops, and its
			// wake-up timer ends with it: only a due scan can find it now.
			slept := time.Now()
			workflowtest.Eventually(t, 10*time.Second, "checkpoint past the document", func() (bool, string) {
				st := first.Stats()
				return st.Pending == 0 && st.CheckpointSaved.After(slept), fmt.Sprintf("%+v", st)
			})
			first.Stop(t)
			second := workflowtest.Start(t, db, reg, opts)
			select {
			case <-woken:
			case <-time.After(15 * time.Second):
				t.Fatalf("the wake-up was not found by the due scan: %+v", second.Stats())
			}
			var ddoc map[string]any
			err := db.Get(ctx, "_design/docstate-due").ScanDoc(&ddoc)
			if tc.indexed && err != nil {
				t.Fatalf("no due index on a database of %d documents: %v", tc.filler, err)
			}
			if !tc.indexed && err == nil {
				t.Fatalf("a due index on a database of %d documents", tc.filler)
			}
		})
	}
}
