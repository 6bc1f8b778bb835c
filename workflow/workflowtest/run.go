package workflowtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// Outcome is what the engine would do with one run of a handler.
type Outcome struct {
	// Next is the state the document would move to; "" when it stays.
	Next string
	// Set and Unset are the fields the run would write and remove.
	Set   map[string]any
	Unset []string
	// Err is the handler's error; Terminal reports whether it would move
	// the document to its error state rather than be retried.
	Err      error
	Terminal bool
}

// Run runs h once on the document raw, as the engine would hand it over,
// without a server, and returns what the engine would write. The error is
// for a raw document the engine would not hand to a handler at all (see
// workflow.NewDoc); the handler's own error is in the Outcome.
func Run(ctx context.Context, h workflow.Handler, raw string) (Outcome, error) {
	doc, err := workflow.NewDoc([]byte(raw))
	if err != nil {
		return Outcome{}, err
	}
	res, herr := h.Handle(ctx, doc)
	if herr != nil {
		return Outcome{Err: herr, Terminal: workflow.IsTerminal(herr)}, nil
	}
	set, unset := res.Changes()
	return Outcome{Next: res.Next(), Set: set, Unset: unset}, nil
}

// Environment variables naming the CouchDB-compatible server NewDB opens
// databases on (docstate's own test servers set them too).
const (
	EnvURL      = "DOCSTATE_TEST_COUCHDB_URL"
	EnvUser     = "DOCSTATE_TEST_COUCHDB_USER"
	EnvPassword = "DOCSTATE_TEST_COUCHDB_PASSWORD"
)

// NewDB creates a fresh database for the test on the server named by
// DOCSTATE_TEST_COUCHDB_URL (with _USER and _PASSWORD, a server admin),
// and deletes it when the test ends. Without the URL the test is skipped,
// saying which variable to set, so a package's tests run wherever a
// server is at hand without copying docstate's test helpers.
func NewDB(tb testing.TB) (*kivik.Client, *kivik.DB) {
	tb.Helper()
	url := os.Getenv(EnvURL)
	if url == "" {
		tb.Skipf("no test server: set %s (and %s, %s) to a CouchDB server admin's URL", EnvURL, EnvUser, EnvPassword)
	}
	client, err := couch.NewClient(couch.Options{URL: url, Username: os.Getenv(EnvUser), Password: os.Getenv(EnvPassword)})
	if err != nil {
		tb.Fatalf("workflowtest: client for %s: %v", url, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "t" + strings.ToLower(strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, tb.Name()))
	name = fmt.Sprintf("%.40s-%s", name, hex.EncodeToString(b))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := client.CreateDB(ctx, name); err != nil {
		tb.Fatalf("workflowtest: create %s: %v", name, err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = client.DestroyDB(ctx, name)
		_ = client.Close()
	})
	return client, client.DB(name)
}
