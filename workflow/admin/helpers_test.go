package admin_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

// putDocs writes n documents {type, state} with ids prefix-0000…
func putDocs(t testing.TB, db *kivik.DB, prefix string, n int, typ, state string, extra map[string]any) []string {
	t.Helper()
	ids := make([]string, 0, n)
	for lo := 0; lo < n; lo += 500 {
		var docs []any
		for i := lo; i < min(lo+500, n); i++ {
			id := fmt.Sprintf("%s-%05d", prefix, i)
			doc := map[string]any{"_id": id, "type": typ, "state": state}
			for k, v := range extra {
				doc[k] = v
			}
			docs = append(docs, doc)
			ids = append(ids, id)
		}
		res, err := db.BulkDocs(context.Background(), docs)
		if err != nil {
			t.Fatalf("bulk docs: %v", err)
		}
		for _, r := range res {
			if r.Error != nil {
				t.Fatalf("bulk doc %s: %v", r.ID, r.Error)
			}
		}
	}
	return ids
}

// stored is a document as read back in tests.
type stored struct {
	ID      string          `json:"_id"`
	Rev     string          `json:"_rev"`
	Type    any             `json:"type"`
	State   any             `json:"state"`
	MetaRaw json.RawMessage `json:"docstate"`
	Meta    *workflow.Meta  `json:"-"`
	Fields  map[string]any  `json:"-"`
}

// states counts documents per state among ids with the prefix.
func states(t testing.TB, db *kivik.DB) map[string]int {
	t.Helper()
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var s stored
		if err := rows.ScanDoc(&s); err != nil {
			t.Fatalf("scan: %v", err)
		}
		if st, ok := s.State.(string); ok {
			out[st]++
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("all docs: %v", err)
	}
	return out
}

// counter counts handler executions per document id.
type counter struct {
	mu sync.Mutex
	n  map[string]int
}

func newCounter() *counter { return &counter{n: map[string]int{}} }

func (c *counter) inc(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n[id]++
	return c.n[id]
}

func (c *counter) get(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[id]
}
