package workflowtest_test

import (
	"context"
	"errors"
	"testing"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func TestRunShowsWhatWouldBeWritten(t *testing.T) {
	h := workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		var n int
		if _, err := doc.Field("n", &n); err != nil || n < 0 {
			return workflow.Result{}, workflow.Terminal(errors.New("n must be a positive number"))
		}
		return workflow.Transition("done").Set("double", 2*n), nil
	})
	out, err := workflowtest.Run(context.Background(), h, `{"_id":"a","type":"job","state":"new","n":21}`)
	if err != nil || out.Next != "done" || out.Set["double"] != 42 || out.Err != nil {
		t.Fatalf("%+v %v", out, err)
	}
	out, err = workflowtest.Run(context.Background(), h, `{"_id":"a","type":"job","state":"new","n":"x"}`)
	if err != nil || !out.Terminal || out.Err == nil {
		t.Fatalf("%+v %v", out, err)
	}
	if _, err := workflowtest.Run(context.Background(), h, `{"_id":"a","type":"job"}`); err == nil {
		t.Fatal("a document without a state was handed over")
	}
}

func TestMain(m *testing.M) { couchtest.Main(m) }

// NewDB opens a fresh database from the DOCSTATE_TEST_COUCHDB_* variables
// and removes it after the test.
func TestNewDBFromTheEnvironment(t *testing.T) {
	var name string
	t.Run("inner", func(t *testing.T) {
		client, db := workflowtest.NewDB(t)
		name = db.Name()
		if _, err := db.Put(context.Background(), "a", map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
		if ok, err := client.DBExists(context.Background(), name); err != nil || !ok {
			t.Fatalf("%s: %v %v", name, ok, err)
		}
	})
	client, _ := workflowtest.NewDB(t)
	if ok, _ := client.DBExists(context.Background(), name); ok {
		t.Fatalf("%s outlived its test", name)
	}
}
