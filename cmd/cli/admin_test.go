package cli_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
)

// failing moves job documents to the error state.
var failing = handlers.Func{SetName: "jobs", Fn: func(reg *workflow.Registry) error {
	return reg.Register(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
			return workflow.Result{}, workflow.Terminal(errors.New("nope"))
		})})
}}

func execute(t *testing.T, sets []handlers.Set, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return sets, nil },
		Stdout:  &out,
		Stderr:  &out,
		Environ: []string{},
	})
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestStatusRetryReplayCommands(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	for _, id := range []string{"a", "b"} {
		doc := map[string]any{"type": "job", "state": "error",
			"docstate": map[string]any{"error": map[string]any{"from": "new", "reason": "nope", "attempts": 1, "at": "2026-01-01T00:00:00.000Z"}}}
		if _, err := db.Put(ctx, id, doc); err != nil {
			t.Fatal(err)
		}
	}
	cfg := writeConfig(t, db.Name(), "")
	sets := []handlers.Set{failing}

	out, err := execute(t, sets, "status", "--config", cfg)
	if err != nil || !strings.Contains(out, "failed        2 in an error state") || !strings.Contains(out, "job") {
		t.Fatalf("status: %v\n%s", err, out)
	}
	out, err = execute(t, sets, "retry", "--config", cfg, "--type", "job", "--dry-run")
	if err != nil || !strings.Contains(out, "2 documents (would run)") || !strings.Contains(out, "safe") {
		t.Fatalf("retry --dry-run: %v\n%s", err, out)
	}
	out, err = execute(t, sets, "retry", "--config", cfg, "a")
	if err != nil || !strings.Contains(out, "1 documents (done)") {
		t.Fatalf("retry a: %v\n%s", err, out)
	}
	var a struct{ State string }
	if err := db.Get(ctx, "a").ScanDoc(&a); err != nil || a.State != "new" {
		t.Fatalf("a after retry: %+v %v", a, err)
	}
	out, err = execute(t, sets, "replay", "--config", cfg, "--since", "0", "--dry-run")
	if err != nil || !strings.Contains(out, "2 documents (would run)") {
		t.Fatalf("replay --since 0 --dry-run: %v\n%s", err, out)
	}
	if out, err = execute(t, sets, "replay", "--config", cfg, "--since", "0", "a"); err == nil {
		t.Fatalf("replay --since with ids accepted:\n%s", out)
	}
}
