package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
)

// With databases.patterns the daemon watches every matching database:
// check reports the mode and the count, run handles all of them and
// exports the supervisor's gauges.
func TestManyDatabaseModeFromConfig(t *testing.T) {
	admin := couchtest.Client(t)
	ctx := context.Background()
	prefix := fmt.Sprintf("clidbs%d", time.Now().UnixNano()%1e6)
	for i := range 5 {
		name := fmt.Sprintf("%s-%d", prefix, i)
		if err := admin.CreateDB(ctx, name); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.DB(name).Put(ctx, "j", map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	addr := freeAddr(t)
	extra := fmt.Sprintf("http:\n  listen: %s\ndatabases:\n  patterns: \"%s-*, nomatch-*\"\n  discovery_interval: 200ms\n  idle_stop: 300ms\n", addr, prefix)
	path := writeConfig(t, "unused", extra)
	sets := func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil }

	var out bytes.Buffer
	check := cli.NewRoot(cli.Options{Sets: sets, Stdout: &out, Stderr: &out, Environ: []string{}})
	check.SetArgs([]string{"check", "--config", path})
	if err := check.ExecuteContext(ctx); err != nil {
		t.Fatalf("check: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "many-database mode: 5 databases match") {
		t.Fatalf("check output:\n%s", out.String())
	}

	var stderr bytes.Buffer
	root := cli.NewRoot(cli.Options{Sets: sets, Stderr: &stderr, Environ: []string{}})
	root.SetArgs([]string{"run", "--config", path})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(runCtx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		n := 0
		for i := range 5 {
			var doc struct{ State string }
			if admin.DB(fmt.Sprintf("%s-%d", prefix, i)).Get(ctx, "j").ScanDoc(&doc) == nil && doc.State == "done" {
				n++
			}
		}
		if n == 5 && scrape(addr, `docstate_databases_watched{engine="docstate"}`) == 5 &&
			scrape(addr, `docstate_transitions_total{engine="docstate"}`) >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 5 done; stderr:\n%s", n, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The built-in sets keep their documents in one control database.
	bad := writeConfig(t, "unused", "databases:\n  patterns: \"a-*\"\nchannels:\n  enabled: true\n")
	out.Reset()
	check = cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}})
	check.SetArgs([]string{"check", "--config", bad})
	if err := check.ExecuteContext(ctx); err == nil || !strings.Contains(out.String(), "need the single-database mode") {
		t.Fatalf("check accepted patterns with channels: %v\n%s", err, out.String())
	}
}
