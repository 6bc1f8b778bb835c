package supervisor_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// BenchmarkManyDatabases is the load tool of many-database mode: it creates
// BENCH_DBS databases (default 200) matching one pattern, runs 1, 2 and 4
// daemons (supervisors with their own owners, max_open 32 each) over them,
// and writes b.N unsafe documents spread over the databases once the
// daemons run. It reports documents per second from the first write to the
// last handler, write→handler-done latency p50/p99 (from each database's
// write acknowledgement), unsafe executions per document (must be 1), heap
// per watched database, and the server's raw single-PUT rate at the same
// concurrency (8 writers) in the same run:
//
//	go test -run '^$' -bench ManyDatabases -benchtime 2000x ./workflow/
//	BENCH_SHARD=1 ...   # daemons split the databases by hash (databases.shard)
//	BENCH_HANDLER_MS=100 BENCH_MAX_OPEN=4 BENCH_WORKERS=2 ...
//	                    # each handler takes 100ms (a mail relay's latency),
//	                    # each daemon runs 4 engines of 2 handlers: the
//	                    # daemons, not the server, are the limit
//	BENCH_DBS=2000 go test -run '^$' -bench 'ManyDatabases/daemons=1$' -benchtime 4000x ./workflow/
func BenchmarkManyDatabases(b *testing.B) {
	nDBs := 200
	if v, err := strconv.Atoi(os.Getenv("BENCH_DBS")); err == nil && v > 0 {
		nDBs = v
	}
	var handlerTime time.Duration
	if os.Getenv("BENCH_HANDLER_MS") != "" {
		handlerTime = time.Duration(envInt(b, "BENCH_HANDLER_MS", 0)) * time.Millisecond
	}
	maxOpen, workers := envInt(b, "BENCH_MAX_OPEN", 32), envInt(b, "BENCH_WORKERS", 8)
	for _, daemons := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("daemons=%d", daemons), func(b *testing.B) {
			client := couchtest.Client(b)
			raw := rawPutRate(b, couchtest.NewDB(b, client), min(b.N, 2000), 8)
			prefix := uniquePrefix(b, "bench-many-")
			// Every database gets one foreign document first: PouchDB Server
			// ignores the longpoll timeout on a database without changes.
			dbs := makeDBs(b, client, prefix, nDBs, func(int) []any {
				return []any{map[string]any{"_id": "seed", "type": "other"}}
			})

			var mu sync.Mutex
			execs := map[string]int{}
			acked := map[string]time.Time{}
			var lat []time.Duration
			var lastDone time.Time
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					now := time.Now()
					mu.Lock()
					execs[doc.DB().Name()+"/"+doc.ID]++
					if at, ok := acked[doc.DB().Name()]; ok {
						lat = append(lat, max(0, now.Sub(at)))
					}
					lastDone = now
					mu.Unlock()
					if handlerTime > 0 {
						select {
						case <-time.After(handlerTime):
						case <-ctx.Done():
							return workflow.Result{}, ctx.Err()
						}
					}
					return workflow.Transition("sent"), nil
				})})
			var sups []*supervisor.Supervisor
			for i := range daemons {
				opts := supervisorOptions(b, prefix+"-*")
				opts.MaxOpen = maxOpen
				opts.Engine.Workers = workers
				opts.DiscoveryInterval = 500 * time.Millisecond
				opts.IdleStop = 2 * time.Second
				opts.Engine.Owner = fmt.Sprintf("bench-daemon-%d", i)
				if os.Getenv("BENCH_SHARD") != "" {
					opts.Shard, opts.Shards = i, daemons
				}
				opts.Engine.CheckpointInterval = 5 * time.Second
				opts.Engine.ResyncInterval = time.Minute // production's: the tests' 300ms is a scan per database 3 times a second
				sups = append(sups, runSupervisor(b, client, reg, opts))
			}
			// Let discovery settle: every database seen once.
			for {
				watched := 0
				for _, s := range sups {
					watched += s.SupervisorStats().Watched
				}
				if os.Getenv("BENCH_SHARD") == "" {
					watched /= daemons
				}
				if watched >= nDBs {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}

			b.ResetTimer()
			startAt := time.Now()
			work := make(chan int, nDBs)
			for i := range nDBs {
				work <- i
			}
			close(work)
			var writers sync.WaitGroup
			for range 8 {
				writers.Go(func() {
					for i := range work {
						per := b.N / nDBs
						if i < b.N%nDBs {
							per++
						}
						if per == 0 {
							continue
						}
						docs := make([]any, per)
						for j := range per {
							docs[j] = map[string]any{"_id": fmt.Sprintf("m%05d", j), "type": "mail", "state": "new"}
						}
						if _, err := dbs[i].BulkDocs(context.Background(), docs); err != nil {
							b.Error(err)
							return
						}
						mu.Lock()
						acked[dbs[i].Name()] = time.Now()
						mu.Unlock()
					}
				})
			}
			writers.Wait()
			deadline := time.Now().Add(10 * time.Minute)
			for {
				mu.Lock()
				n := len(execs)
				mu.Unlock()
				if n >= b.N {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d handled", n, b.N)
				}
				time.Sleep(20 * time.Millisecond)
			}
			b.StopTimer()
			mu.Lock()
			elapsed := lastDone.Sub(startAt)
			twice := 0
			for _, c := range execs {
				if c != 1 {
					twice++
				}
			}
			slices.Sort(lat)
			p := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) / 1000 }
			p50, p99 := p(0.5), p(0.99)
			mu.Unlock()
			var maxOpen, started int64
			var sum workflow.Stats
			for _, s := range sups {
				st := s.SupervisorStats()
				maxOpen, started = max(maxOpen, st.MaxOpen), started+st.Started
				e := st.EngineSums
				sum.ClaimsHeld, sum.ClaimsLost, sum.FeedResets, sum.Transient = sum.ClaimsHeld+e.ClaimsHeld, sum.ClaimsLost+e.ClaimsLost, sum.FeedResets+e.FeedResets, sum.Transient+e.Transient
			}
			if os.Getenv("BENCH_VERBOSE") != "" {
				fmt.Fprintf(os.Stderr, "engines started %d, claims held %d lost %d, feed resets %d, transient %d\n",
					started, sum.ClaimsHeld, sum.ClaimsLost, sum.FeedResets, sum.Transient)
			}
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "docs/s")
			b.ReportMetric(raw, "raw-put/s")
			b.ReportMetric(p50, "p50-ms")
			b.ReportMetric(p99, "p99-ms")
			b.ReportMetric(float64(twice), "run-twice")
			b.ReportMetric(float64(maxOpen), "max-open")
			b.ReportMetric(float64(ms.HeapAlloc)/float64(nDBs)/1024, "heap-KiB/db")
			if twice != 0 {
				b.Fatalf("%d unsafe documents ran more than once", twice)
			}
		})
	}
}
