package workflow_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// BenchmarkTransitions measures one-step transitions per second through the
// engine against the real server, safe and unsafe, beside the server's own
// rates for raw single-document PUT updates and raw _bulk_docs updates (250
// a request) at the same concurrency c, all in the same run. Each op is one
// document of each case. Run it with a fixed count, e.g.
//
//	go test -run '^$' -bench Transitions -benchtime 1500x ./workflow/
//
// (BENCH_FEED_WITHOUT_BODIES=1 runs the engines with FeedWithoutBodies)
// and read the ratios: unsafe-x-safe (target >= 0.4), safe-x-bulk (target
// >= 0.7 at c=16) and safe-x-put. scripts/benchguard runs it briefly in the
// test command and fails on a ratio far below target.
func BenchmarkTransitions(b *testing.B) {
	for _, c := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) {
			client := couchtest.Client(b)
			rawPut := rawPutRate(b, couchtest.NewDB(b, client), b.N, c)
			rawBulk := rawBulkRate(b, couchtest.NewDB(b, client), b.N, c, 250)
			safe := engineRate(b, couchtest.NewDB(b, client), b.N, c, workflow.Safe)
			unsafe := engineRate(b, couchtest.NewDB(b, client), b.N, c, workflow.Unsafe)
			b.ReportMetric(rawPut, "raw-put/s")
			b.ReportMetric(rawBulk, "raw-bulk/s")
			b.ReportMetric(safe, "safe/s")
			b.ReportMetric(unsafe, "unsafe/s")
			b.ReportMetric(unsafe/safe, "unsafe-x-safe")
			b.ReportMetric(safe/rawBulk, "safe-x-bulk")
			b.ReportMetric(safe/rawPut, "safe-x-put")
		})
	}
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

// engineRate moves n documents new → done through an engine with c workers
// and returns documents per second, from engine start to the last write.
func engineRate(b *testing.B, db *kivik.DB, n, c int, mode workflow.Mode) float64 {
	return engineRateBatch(b, db, n, c, mode, 0)
}

// engineRateBatch is engineRate with the engine's group commit batch size
// (0: the default; 1: off).
func engineRateBatch(b *testing.B, db *kivik.DB, n, c int, mode workflow.Mode, batch int) float64 {
	b.Helper()
	putDocs(b, db, "job", n, "job", "new", nil)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: mode,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			return workflow.Transition("done"), nil
		})})
	opts := workflowtest.Options(b)
	opts.Workers = c
	opts.BatchSize = batch
	if v, err := strconv.Atoi(os.Getenv("BENCH_BATCH")); err == nil && batch == 0 {
		opts.BatchSize = v
	}
	if l := os.Getenv("BENCH_LINGER"); l != "" {
		opts.FeedLinger, _ = time.ParseDuration(l)
	}
	opts.FeedWithoutBodies = os.Getenv("BENCH_FEED_WITHOUT_BODIES") == "1"
	// Production's checkpoint interval: the tests' 100ms adds ten writes a
	// second that a deployed daemon does not make. Production's resync
	// interval too: the tests' 300ms makes the server scan the whole
	// database (a Mango query without index) three times a second.
	opts.CheckpointInterval = 5 * time.Second
	opts.ResyncInterval = time.Minute
	opts.NoStartScan = true // the feed delivers every document; the scan would only add reads
	b.ResetTimer()
	startAt := time.Now()
	eng := workflowtest.Start(b, db, reg, opts)
	deadline := time.Now().Add(10 * time.Minute)
	for eng.Stats().Transitions < int64(n) {
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d transitions", eng.Stats().Transitions, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
	elapsed := time.Since(startAt)
	b.StopTimer()
	stop(b, eng)
	return float64(n) / elapsed.Seconds()
}

// stop stops the engine once its feed has read back its own writes, then
// gives the server a moment before the test deletes the database: PouchDB
// Server crashes ("complete.results is undefined") when a database is
// deleted while it still gathers rows for a longpoll whose client went
// away, which a stop in the middle of catching up leaves behind.
func stop(b *testing.B, eng *workflowtest.Running) {
	b.Helper()
	workflowtest.Eventually(b, time.Minute, "feed caught up", func() (bool, string) {
		s := eng.Stats()
		return s.Pending == 0 && s.Queued == 0 && s.Inflight == 0, fmt.Sprintf("%+v", s)
	})
	eng.Stop(b)
	time.Sleep(300 * time.Millisecond)
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
