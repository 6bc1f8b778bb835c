package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
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

// TestReplaySinceSkipsAndCarriesOn is replay --since 0 on a database with
// a design document (the devices set's), a document without a state and a
// document of a type the binary does not handle: a dry run lists the
// workflow documents and counts the rest as skipped; a real run past a
// document it cannot handle (corrupt engine metadata) still writes the
// documents after it, reports the one, prints the summary and exits
// non-zero. -o json prints the same report for scripts.
func TestReplaySinceSkipsAndCarriesOn(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	put := func(id string, doc map[string]any) string {
		t.Helper()
		rev, err := db.Put(ctx, id, doc)
		if err != nil {
			t.Fatal(err)
		}
		return rev
	}
	put("a", map[string]any{"type": "job", "state": "new"})
	put("_design/docstate-devices", map[string]any{"validate_doc_update": "function(){}"})
	put("b", map[string]any{"type": "job"})
	put("c", map[string]any{"type": "invoice", "state": "open"})
	put("d", map[string]any{"type": "job", "state": "new"})
	cfg := writeConfig(t, db.Name(), "")
	sets := []handlers.Set{jobs}

	out, err := execute(t, sets, "replay", "--config", cfg, "--since", "0", "--dry-run")
	if err != nil || !strings.Contains(out, "2 documents (would run), 3 skipped (1 design, 1 unregistered type, 1 no state)") {
		t.Fatalf("replay --since 0 --dry-run: %v\n%s", err, out)
	}
	if strings.Contains(out, "\r") {
		t.Fatalf("progress printed to a buffer, not a terminal:\n%q", out)
	}

	put("c2", map[string]any{"type": "job", "state": "new", "docstate": "corrupt"})
	lastRev := put("e", map[string]any{"type": "job", "state": "new"})
	out, err = execute(t, sets, "replay", "--config", cfg, "--since", "0")
	if err == nil || !strings.Contains(out, "failed c2: ") ||
		!strings.Contains(out, "3 documents (done), 3 skipped (1 design, 1 unregistered type, 1 no state), 1 failed") {
		t.Fatalf("replay --since 0 past a corrupt document: %v\n%s", err, out)
	}
	var e struct {
		Rev string `json:"_rev"`
	}
	if err := db.Get(ctx, "e").ScanDoc(&e); err != nil || e.Rev == lastRev {
		t.Fatalf("the document after the failed one was not replayed: %+v %v", e, err)
	}

	out, err = executeStdout(t, sets, "replay", "--config", cfg, "a", "b", "-o", "json")
	var rep struct {
		DryRun    bool `json:"dry_run"`
		Documents []struct {
			ID, Type, From, To, Handler string
		} `json:"documents"`
		Skipped map[string]int `json:"skipped"`
		Errors  []any          `json:"errors"`
	}
	if err != nil || json.Unmarshal([]byte(out), &rep) != nil || len(rep.Documents) != 1 || rep.Documents[0].ID != "a" ||
		rep.Documents[0].Handler != "safe" || rep.Skipped["no_state"] != 1 || rep.Errors == nil {
		t.Fatalf("replay -o json: %v %+v\n%s", err, rep, out)
	}
}

// executeStdout runs the command line and returns only its stdout: what a
// script parses.
func executeStdout(t *testing.T, sets []handlers.Set, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return sets, nil },
		Stdout:  &out,
		Stderr:  &errOut,
		Environ: []string{},
	})
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if err != nil {
		t.Logf("stderr: %s", errOut.String())
	}
	return out.String(), err
}
