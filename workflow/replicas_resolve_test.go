package workflow_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func TestReplicasYieldedBranchesResolved(t *testing.T) {
	front := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{})
	db := front.DB(t, 0)
	ctx := context.Background()
	rev1, err := db.Put(ctx, "x", map[string]any{"type": "mail", "state": "new"})
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-time.Minute).UTC().Format("2006-01-02T15:04:05.000Z")
	var docs []any
	for i, h := range []string{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccccccccccccccc"} {
		docs = append(docs, map[string]any{"_id": "x", "_rev": "2-" + h, "type": "mail", "state": "new",
			"_revisions": map[string]any{"start": 2, "ids": []string{h, rev1[2:]}},
			"docstate":   map[string]any{"state": "new", "claims": 1, "key": "x/new/1", "due": past, "yielded": true, "n": i}})
	}
	if _, err := db.BulkDocs(ctx, docs, kivik.Param("new_edits", false)); err != nil {
		t.Fatal(err)
	}
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Transition("sent"), nil
		})})
	workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 20*time.Second, "sent", func() (bool, string) {
		d := get(t, db, "x")
		return d.State == "sent" && conflicted(t, db) == 0, fmt.Sprint(d.State, conflicted(t, db))
	})
}
