package workflow_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// BenchmarkGroupCommit measures safe and unsafe one-step transitions per
// second with group commit on (the default) and off, beside the server's own
// rates for the same updates as raw single PUTs and as raw _bulk_docs
// requests (of the default batch size, 250), all at concurrency c and in the same
// run. Each op is one document:
//
//	go test -run '^$' -bench GroupCommit -benchtime 4000x ./workflow/
//
// x-put is docs/s over the raw single-PUT rate, x-bulk over the raw
// _bulk_docs rate.
func BenchmarkGroupCommit(b *testing.B) {
	for _, mode := range []workflow.Mode{workflow.Safe, workflow.Unsafe} {
		for _, c := range []int{4, 16} {
			b.Run(fmt.Sprintf("%s/c=%d", mode, c), func(b *testing.B) {
				client := couchtest.Client(b)
				rawPut := rawPutRate(b, couchtest.NewDB(b, client), b.N, c)
				rawBulk := rawBulkRate(b, couchtest.NewDB(b, client), b.N, c, 250)
				on := engineRateBatch(b, couchtest.NewDB(b, client), b.N, c, mode, 0)
				off := engineRateBatch(b, couchtest.NewDB(b, client), b.N, c, mode, 1)
				b.ReportMetric(rawPut, "raw-put/s")
				b.ReportMetric(rawBulk, "raw-bulk/s")
				b.ReportMetric(on, "docs/s")
				b.ReportMetric(off, "unbatched/s")
				b.ReportMetric(on/rawPut, "x-put")
				b.ReportMetric(on/rawBulk, "x-bulk")
			})
		}
	}
}

// rawBulkRate updates n existing documents once each through _bulk_docs
// requests of size docs, c requests at a time.
func rawBulkRate(b *testing.B, db *kivik.DB, n, c, size int) float64 {
	b.Helper()
	putDocs(b, db, "raw", n, "job", "new", nil)
	var docs []any
	rows := db.AllDocs(context.Background())
	for rows.Next() {
		var v struct {
			Rev string `json:"rev"`
		}
		if err := rows.ScanValue(&v); err != nil {
			b.Fatal(err)
		}
		id, _ := rows.ID()
		docs = append(docs, map[string]any{"_id": id, "_rev": v.Rev, "type": "job", "state": "done"})
	}
	_ = rows.Close()
	work := make(chan []any, n/size+1)
	for chunk := range slices.Chunk(docs, size) {
		work <- chunk
	}
	close(work)
	startAt := time.Now()
	var wg sync.WaitGroup
	for range c {
		wg.Go(func() {
			for chunk := range work {
				res, err := db.BulkDocs(context.Background(), chunk)
				if err != nil {
					b.Error(err)
					return
				}
				for _, r := range res {
					if r.Error != nil {
						b.Error(r.Error)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	return float64(len(docs)) / time.Since(startAt).Seconds()
}

// BenchmarkLatency measures the time from a document's write (its
// acknowledgement) to the end of its handler's run, safe and unsafe (claim,
// run, result) with group commit and safe without, at a steady offered
// load: BENCH_RATE docs/s, written in small _bulk_docs every 10ms as
// replication delivers them. The default, 1350, is half of the live rate at
// which the engine saturates with 16 workers on PouchDB Server here (about
// 2700 docs/s while the server also takes the writers' inserts; run with
// BENCH_RATE=6000 to see it as handled-docs/s). It reports p50/p90/p99/max
// in milliseconds and the rates offered and handled:
//
//	go test -run '^$' -bench Latency -benchtime 8000x ./workflow/
func BenchmarkLatency(b *testing.B) {
	rate := 1350.0
	if s := os.Getenv("BENCH_RATE"); s != "" {
		var err error
		if rate, err = strconv.ParseFloat(s, 64); err != nil || rate <= 0 {
			b.Fatalf("BENCH_RATE=%q: want a positive number", s)
		}
	}
	cases := []struct {
		mode  workflow.Mode
		batch int
	}{{workflow.Safe, 0}, {workflow.Unsafe, 0}, {workflow.Safe, 1}}
	for _, tc := range cases {
		batch := tc.batch
		name := fmt.Sprintf("%s/batch=on", tc.mode)
		if batch == 1 {
			name = fmt.Sprintf("%s/batch=off", tc.mode)
		}
		b.Run(name, func(b *testing.B) {
			db := couchtest.NewDB(b, couchtest.Client(b))
			var mu sync.Mutex
			lat := make([]time.Duration, 0, b.N)
			acked := make(map[string]time.Time, b.N)
			early := make(map[string]time.Time)
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: tc.mode,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					done := time.Now()
					mu.Lock()
					if at, ok := acked[doc.ID]; ok {
						lat = append(lat, max(0, done.Sub(at)))
					} else {
						early[doc.ID] = done // ran before the writer saw the answer
					}
					mu.Unlock()
					return workflow.Transition("done"), nil
				})})
			// PouchDB Server does not end a longpoll on a database that
			// never had a change (its timeout is ignored), so the feed would
			// never report ready: give it one foreign document.
			putDocs(b, db, "seed", 1, "other", "new", nil)
			opts := workflowtest.Options(b)
			opts.Workers = 16
			opts.BatchSize = batch
			if l := os.Getenv("BENCH_LINGER"); l != "" {
				opts.FeedLinger, _ = time.ParseDuration(l)
			}
			opts.CheckpointInterval = 5 * time.Second
			eng := workflowtest.Start(b, db, reg, opts)
			workflowtest.Eventually(b, 30*time.Second, "feed ready", func() (bool, string) {
				return eng.Ready() == nil, "not ready"
			})

			const tick = 10 * time.Millisecond
			perTick := max(1, int(rate*tick.Seconds()))
			b.ResetTimer()
			startAt := time.Now()
			t := time.NewTicker(tick)
			var writers sync.WaitGroup
			for sent := 0; sent < b.N; sent += perTick {
				<-t.C
				docs := make([]any, 0, perTick)
				for i := sent; i < min(sent+perTick, b.N); i++ {
					docs = append(docs, map[string]any{"_id": fmt.Sprintf("job-%06d", i), "type": "job", "state": "new"})
				}
				writers.Go(func() {
					res, err := db.BulkDocs(context.Background(), docs)
					if err != nil {
						b.Error(err)
						return
					}
					// The clock starts when the write is acknowledged.
					now := time.Now()
					mu.Lock()
					defer mu.Unlock()
					for _, r := range res {
						acked[r.ID] = now
						if _, ok := early[r.ID]; ok {
							lat = append(lat, 0)
							delete(early, r.ID)
						}
					}
				})
			}
			t.Stop()
			writers.Wait()
			offered := float64(b.N) / time.Since(startAt).Seconds()
			workflowtest.Eventually(b, 5*time.Minute, "all handled", func() (bool, string) {
				mu.Lock()
				defer mu.Unlock()
				return len(lat) >= b.N, fmt.Sprintf("%d of %d", len(lat), b.N)
			})
			handled := float64(b.N) / time.Since(startAt).Seconds()
			b.StopTimer()
			stop(b, eng)
			mu.Lock()
			defer mu.Unlock()
			slices.Sort(lat)
			b.ReportMetric(offered, "offered-docs/s")
			b.ReportMetric(handled, "handled-docs/s")
			ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) / 1000 }
			b.ReportMetric(ms(0.50), "p50-ms")
			b.ReportMetric(ms(0.90), "p90-ms")
			b.ReportMetric(ms(0.99), "p99-ms")
			b.ReportMetric(ms(1), "max-ms")
		})
	}
}
