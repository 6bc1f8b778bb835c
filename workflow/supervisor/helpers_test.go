package supervisor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

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

func get(t testing.TB, db *kivik.DB, id string) stored {
	t.Helper()
	var s stored
	if err := db.Get(context.Background(), id).ScanDoc(&s); err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	var all map[string]any
	_ = db.Get(context.Background(), id).ScanDoc(&all)
	s.Fields = all
	var m workflow.Meta
	if len(s.MetaRaw) > 0 && json.Unmarshal(s.MetaRaw, &m) == nil {
		s.Meta = &m
	}
	return s
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

func (c *counter) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := 0
	for _, v := range c.n {
		s += v
	}
	return s
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func oneStep(runs *counter, to string) workflow.Handler {
	return workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		runs.inc(doc.ID)
		return workflow.Transition(to).Set("handled_at_attempt", doc.Attempt), nil
	})
}

// rawPutRate updates n existing documents once each with c writers.
func rawPutRate(b *testing.B, db *kivik.DB, n, c int) float64 {
	b.Helper()
	ids := putDocs(b, db, "raw", n, "job", "new", nil)
	revs := make(map[string]string, n)
	rows := db.AllDocs(context.Background())
	for rows.Next() {
		var v struct {
			Rev string `json:"rev"`
		}
		if err := rows.ScanValue(&v); err != nil {
			b.Fatal(err)
		}
		id, _ := rows.ID()
		revs[id] = v.Rev
	}
	_ = rows.Close()
	work := make(chan string, n)
	for _, id := range ids {
		work <- id
	}
	close(work)
	ctx := context.Background()
	startAt := time.Now()
	var wg sync.WaitGroup
	for range c {
		wg.Go(func() {
			for id := range work {
				doc := map[string]any{"_id": id, "_rev": revs[id], "type": "job", "state": "done"}
				if _, err := db.Put(ctx, id, doc); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return float64(n) / time.Since(startAt).Seconds()
}

// makeDBsConcurrently creates n databases prefix-NNNN, each with one
// document no handler wants, c at a time.
func makeDBsConcurrently(b *testing.B, client *kivik.Client, prefix string, n, c int) {
	work := make(chan int)
	var wg sync.WaitGroup
	for range c {
		wg.Go(func() {
			for i := range work {
				name := fmt.Sprintf("%s-%04d", prefix, i)
				if err := client.CreateDB(context.Background(), name); err != nil {
					b.Error(err)
					continue
				}
				if _, err := client.DB(name).Put(context.Background(), "seed", map[string]any{"type": "other"}); err != nil {
					b.Error(err)
				}
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
}

func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}
