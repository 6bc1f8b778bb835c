package cli_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/internal/couchtest"
)

// docstate run with channels.enabled (the built-in sets) provisions a
// channel, counts it in docstate_channels_provisioned_total and records
// the subscription URL from channels.public_url.
func TestRunProvisionsChannelsFromConfig(t *testing.T) {
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	addr := freeAddr(t)
	path := writeConfig(t, db.Name(), "http:\n  listen: "+addr+"\nchannels:\n  enabled: true\n  prefix: clitest-\n  public_url: https://couch.example.com/\n")
	ctx := context.Background()
	if _, err := db.Put(ctx, "c1", map[string]any{"type": "channel", "state": "new", "owner": "o@example.com", "name": "From the CLI"}); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	root := cli.NewRoot(cli.Options{Stderr: &stderr, Environ: []string{}})
	root.SetArgs([]string{"run", "--config", path})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(runCtx) }()
	defer func() { cancel(); <-done }()

	var doc struct {
		State    string `json:"state"`
		Database string `json:"database"`
		URL      string `json:"url"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for doc.State != "ready" || scrape(addr, `docstate_channels_provisioned_total{engine="docstate"}`) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("channel %+v; stderr:\n%s", doc, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
		_ = db.Get(ctx, "c1").ScanDoc(&doc)
	}
	if want := "https://couch.example.com/" + doc.Database; doc.URL != want || doc.Database[:8] != "clitest-" {
		t.Fatalf("database %q url %q, want %q", doc.Database, doc.URL, want)
	}
	if err := admin.DestroyDB(ctx, doc.Database); err != nil {
		t.Fatal(err)
	}
}
