package cli_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
)

// designSet provisions a design document, the way the devices set installs
// its validation function: read, compare, write when missing or changed.
type designSet struct{ db *kivik.DB }

const provisionedID = "_design/docstate-test"

func (designSet) Name() string                      { return "testdesign" }
func (designSet) Register(*workflow.Registry) error { return nil }

func (s designSet) Provision(ctx context.Context) error {
	_, err := s.Repair(ctx)
	return err
}

func (s designSet) Repair(ctx context.Context) ([]string, error) {
	var cur map[string]any
	err := s.db.Get(ctx, provisionedID).ScanDoc(&cur)
	doc := map[string]any{"language": "javascript", "views": map[string]any{"by_state": map[string]any{"map": "function(d){emit(d.state)}"}}}
	switch {
	case couch.IsNotFound(err):
	case err != nil:
		return nil, err
	default:
		if fmt.Sprint(cur["views"]) == fmt.Sprint(doc["views"]) {
			return nil, nil
		}
		doc["_rev"] = cur["_rev"]
	}
	if _, err := s.db.Put(ctx, provisionedID, doc); err != nil {
		return nil, err
	}
	return []string{"design document " + provisionedID}, nil
}

// What a set provisioned is put back while the daemon runs, not only at
// start: deleted, or edited by hand, it is back within one
// engine.resync_interval, with a log line and a metric.
func TestProvisioningHealsItself(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	addr := freeAddr(t)
	path := writeConfig(t, db.Name(), "engine:\n  resync_interval: 1s\nhttp:\n  listen: "+addr+"\n")
	stderr := &syncBuffer{}
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{designSet{db}}, nil },
		Stderr:  stderr,
		Environ: []string{},
	})
	root.SetArgs([]string{"run", "--config", path})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	defer func() { cancel(); <-done }()

	rev := func() string {
		var d struct {
			Rev   string         `json:"_rev"`
			Views map[string]any `json:"views"`
		}
		if err := db.Get(context.Background(), provisionedID).ScanDoc(&d); err != nil || d.Views["by_state"] == nil {
			return ""
		}
		return d.Rev
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 10s; log:\n%s", what, stderr.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFor("provisioned at start", func() bool { return rev() != "" })

	if _, err := db.Delete(context.Background(), provisionedID, rev()); err != nil {
		t.Fatal(err)
	}
	waitFor("deleted design document put back", func() bool { return rev() != "" })

	if _, err := db.Put(context.Background(), provisionedID, map[string]any{"_rev": rev(), "language": "javascript", "views": map[string]any{}}); err != nil {
		t.Fatal(err)
	}
	waitFor("edited design document put back", func() bool { return rev() != "" })

	series := `docstate_provision_repairs_total{engine="docstate",set="testdesign"}`
	waitFor("repairs counted", func() bool { return scrape(addr, series) >= 2 })
	if n := strings.Count(stderr.String(), "provisioning repaired"); n < 2 {
		t.Fatalf("%d repair log lines, want 2; log:\n%s", n, stderr.String())
	}
	if ok := scrape(addr, `docstate_provision_checks_total{engine="docstate",result="ok"}`); ok < 2 {
		t.Fatalf("provision checks ok = %v", ok)
	}
}
