package workflow_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// An order handler: orders in state "new" are checked and accepted or
// rejected. The engine writes the result; the handler never saves the doc.
func Example() {
	ctx := context.Background()
	client, err := couch.NewClient(couch.Options{
		URL:      os.Getenv("DOCSTATE_TEST_COUCHDB_URL"),
		Username: os.Getenv("DOCSTATE_TEST_COUCHDB_USER"),
		Password: os.Getenv("DOCSTATE_TEST_COUCHDB_PASSWORD"),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = client.CreateDB(ctx, "example-orders")
	defer func() { _ = client.DestroyDB(ctx, "example-orders") }()
	db := client.DB("example-orders")

	reg := workflow.NewRegistry()
	err = reg.Register(workflow.Spec{
		Type: "order", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			var order struct {
				Items []string `json:"items"`
			}
			if err := doc.Decode(&order); err != nil {
				return workflow.Result{}, workflow.Terminal(err) // retrying cannot fix a bad document
			}
			if len(order.Items) == 0 {
				return workflow.Transition("rejected").Set("reason", "no items"), nil
			}
			return workflow.Transition("accepted").Set("item_count", len(order.Items)), nil
		}),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	_, _ = db.Put(ctx, "order-1", map[string]any{"type": "order", "state": "new", "items": []string{"tea"}})
	_, _ = db.Put(ctx, "order-2", map[string]any{"type": "order", "state": "new"})

	eng, err := workflow.New(db, reg, workflow.Options{
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- eng.Run(runCtx) }()
	for _, id := range []string{"order-1", "order-2"} {
		state, err := waitForState(ctx, db, id, "new")
		fmt.Println(id, state, err)
	}
	stop()
	if err := <-done; err != nil {
		fmt.Println(err)
	}
	// Output:
	// order-1 accepted <nil>
	// order-2 rejected <nil>
}

// waitForState polls a document until its state is no longer from.
func waitForState(ctx context.Context, db *kivik.DB, id, from string) (string, error) {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var doc struct {
			State string `json:"state"`
		}
		if err := db.Get(ctx, id).ScanDoc(&doc); err == nil && doc.State != from {
			return doc.State, nil
		}
	}
	return "", errors.New("timed out")
}
