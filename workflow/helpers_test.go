package workflow_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

// testOptions are engine options with the intervals shortened for tests.
func testOptions(t testing.TB) workflow.Options {
	return workflow.Options{
		Workers:            8,
		HandlerTimeout:     5 * time.Second,
		Lease:              10 * time.Second,
		RetryBase:          50 * time.Millisecond,
		RetryMax:           200 * time.Millisecond,
		FeedTimeout:        2 * time.Second,
		FeedRetryMin:       50 * time.Millisecond,
		FeedRetryMax:       500 * time.Millisecond,
		CheckpointInterval: 100 * time.Millisecond,
		ResyncInterval:     500 * time.Millisecond,
		DrainTimeout:       5 * time.Second,
		Logger:             testLogger(t),
	}
}

// testLogger shows warnings in the test output, or everything with
// DOCSTATE_TEST_LOG=debug.
func testLogger(t testing.TB) *slog.Logger {
	level := slog.LevelWarn
	if os.Getenv("DOCSTATE_TEST_LOG") == "debug" {
		level = slog.LevelDebug
	}
	var w io.Writer = t.Output()
	if testing.Verbose() || level == slog.LevelDebug {
		return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelError}))
}

// running is an engine running in the background of a test.
type running struct {
	*workflow.Engine
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// start runs an engine until the test ends or stop is called.
func start(t testing.TB, db *kivik.DB, reg *workflow.Registry, opts workflow.Options) *running {
	t.Helper()
	eng, err := workflow.New(db, reg, opts)
	if err != nil {
		t.Fatalf("workflow.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Engine: eng, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- eng.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the engine and waits for Run to return. It may be called
// more than once.
func (r *running) stop(t testing.TB) {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("engine Run: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("engine did not stop within 60s")
		}
	})
}

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

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not reached within %v: %s", what, timeout, last)
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
