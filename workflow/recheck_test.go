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

// An in-memory recheck is no due time: a supervisor that stopped the
// engine would start it again for a recheck the new engine does not have.
// A wake-up is one.
func TestRecheckIsNotADueTime(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			if doc.ID == "wake" {
				return workflow.Stay().WakeAt(time.Now().Add(time.Hour)), nil
			}
			return workflow.Stay().RecheckAfter(time.Hour), nil
		})})
	eng := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	if _, err := db.Put(context.Background(), "recheck", map[string]any{"type": "job", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 10*time.Second, "recheck run", func() (bool, string) {
		return eng.Stats().Runs >= 1, fmt.Sprint(eng.Stats().Runs)
	})
	time.Sleep(200 * time.Millisecond)
	if due := eng.NextDue(); !due.IsZero() {
		t.Fatalf("NextDue %v with only a recheck pending", due)
	}
	if _, err := db.Put(context.Background(), "wake", map[string]any{"type": "job", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 10*time.Second, "wake-up due", func() (bool, string) {
		due := eng.NextDue()
		return !due.IsZero() && time.Until(due) > 50*time.Minute, fmt.Sprint(due)
	})
}
