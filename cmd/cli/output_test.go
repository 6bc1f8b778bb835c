package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
)

// TestEveryCommandHasExamples: each command's help shows an Examples
// section, the first thing an operator scripting it looks for.
func TestEveryCommandHasExamples(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Example == "" {
			t.Errorf("%q has no Example", c.CommandPath())
		}
		var out bytes.Buffer
		root := cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}})
		args := append(strings.Fields(c.CommandPath())[1:], "--help")
		root.SetArgs(args)
		if err := root.ExecuteContext(context.Background()); err != nil || !strings.Contains(out.String(), "Examples:") {
			t.Errorf("%v: %v, no Examples section:\n%s", args, err, out.String())
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(cli.NewRoot(cli.Options{Environ: []string{}}))
}

// TestOutputJSON: status, config keys and config show print JSON with
// lower-case keys under -o json; an unknown format is refused.
func TestOutputJSON(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	if _, err := db.Put(context.Background(), "a", map[string]any{"type": "job", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	cfg := writeConfig(t, db.Name(), "")
	sets := []handlers.Set{jobs}

	out, err := executeStdout(t, sets, "status", "--config", cfg, "-o", "json")
	var st map[string]any
	if err != nil || json.Unmarshal([]byte(out), &st) != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	for _, k := range []string{"checkpoint", "pending", "states", "claims_held", "claims_expired", "failed", "invalid", "retry_waiting", "docs"} {
		if _, ok := st[k]; !ok {
			t.Errorf("status -o json lacks %q:\n%s", k, out)
		}
	}
	if _, ok := st["checkpoint_saved"]; ok {
		t.Errorf("status -o json has a checkpoint_saved where none was saved:\n%s", out)
	}

	out, err = executeStdout(t, sets, "config", "keys", "-o", "json")
	var keys []map[string]any
	if err != nil || json.Unmarshal([]byte(out), &keys) != nil || len(keys) < 10 {
		t.Fatalf("config keys -o json: %v\n%s", err, out)
	}
	if keys[0]["key"] == nil || keys[0]["env"] == nil || keys[0]["default"] == nil || keys[0]["help"] == nil || keys[0]["type"] == nil {
		t.Fatalf("config keys -o json: first entry %v", keys[0])
	}

	out, err = executeStdout(t, sets, "config", "show", "--config", cfg, "--set", "engine.workers=7",
		"--set", "couchdb.password=hunter2", "--set", "couchdb.password_file=", "-o", "json")
	var values map[string]string
	if err != nil || json.Unmarshal([]byte(out), &values) != nil || values["engine.workers"] != "7" ||
		values["database"] != db.Name() || strings.Contains(out, "hunter2") {
		t.Fatalf("config show -o json: %v\n%s", err, out)
	}

	if out, err := execute(t, sets, "config", "keys", "-o", "yaml"); err == nil {
		t.Fatalf("-o yaml accepted:\n%s", out)
	}
}

// TestSetCompletesConfigKeys: shell completion of --set offers the config
// keys, with "=" and no space, so the value is typed next.
func TestSetCompletesConfigKeys(t *testing.T) {
	out, err := execute(t, nil, "__complete", "run", "--set", "engine.wor")
	// The last line is cobra's directive: 2 is ShellCompDirectiveNoSpace.
	if err != nil || !strings.Contains(out, "engine.workers=\t") || strings.Contains(out, "smtp.host") ||
		!strings.Contains(out, "\n:2\n") {
		t.Fatalf("completion of --set engine.wor: %v\n%s", err, out)
	}
	out, err = execute(t, nil, "__complete", "status", "-o", "")
	if err != nil || !strings.Contains(out, "json") || !strings.Contains(out, "text") {
		t.Fatalf("completion of -o: %v\n%s", err, out)
	}
}
