package supervisor_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// BenchmarkTrickle is the many-database scale check: BENCH_DBS databases
// (default 2000) watched by one daemon (max_open 32, discovery every
// BENCH_INTERVAL, default 2s), and b.N documents written one at a time into
// random databases at BENCH_RATE per second (default 20), the trickle of a
// user base where few users act at once. It runs once with _all_dbs
// discovery (PouchDB Server as it is) and once with /_db_updates (through
// couchtest's front that serves the feed), and reports the time from each
// write's acknowledgement to its handler's start (p50, p99, max: detection
// must stay within the interval plus one discovery's duration), the
// listings of _all_dbs, the most engines open and the most connections
// this process held to the server (counted in /proc), and the heap after
// the run (all of it, and per watched database):
//
//	go test -run '^$' -bench Trickle -benchtime 400x -timeout 30m ./workflow/
//
// BENCH_DISCOVERY=all_dbs or db_updates runs one mode only; BENCH_LOG=path
// writes each mode's debug log to path.<mode>, to read engines' timelines.
func BenchmarkTrickle(b *testing.B) {
	nDBs := envInt(b, "BENCH_DBS", 2000)
	rate := envInt(b, "BENCH_RATE", 20)
	interval := 2 * time.Second
	if v := os.Getenv("BENCH_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			b.Fatalf("BENCH_INTERVAL=%q: want a duration", v)
		}
		interval = d
	}
	direct := couchtest.Client(b)
	prefix := uniquePrefix(b, "trickle-")
	began := time.Now()
	// One foreign document each: PouchDB Server ignores the longpoll
	// timeout on a database without changes.
	makeDBsConcurrently(b, direct, prefix, nDBs, 8)
	b.Logf("%d databases created in %v", nDBs, time.Since(began).Round(time.Millisecond))

	round := 0
	for _, mode := range []string{supervisor.DiscoveryAllDBs, supervisor.DiscoveryDBUpdates} {
		if only := os.Getenv("BENCH_DISCOVERY"); only != "" && only != mode {
			continue
		}
		b.Run("discovery="+mode, func(b *testing.B) {
			round++
			client, serverURL := direct, couchtest.Options(b).URL
			if mode == supervisor.DiscoveryDBUpdates {
				front := couchtest.NewDBUpdatesServer(b)
				client, serverURL = front.Client(b), front.Options().URL
			}
			var mu sync.Mutex
			acked := map[string]time.Time{}
			var lat []time.Duration
			var handled atomic.Int64
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					now := time.Now()
					key := doc.DB().Name() + "/" + doc.ID
					mu.Lock()
					if at, ok := acked[key]; ok {
						lat = append(lat, max(0, now.Sub(at)))
						delete(acked, key)
						handled.Add(1)
					}
					mu.Unlock()
					return workflow.Transition("done"), nil
				})})
			opts := supervisorOptions(b, prefix+"-*")
			opts.MaxOpen = 32
			opts.DiscoveryInterval = interval
			opts.IdleStop = 30 * time.Second // production's
			opts.Turn = time.Minute
			opts.Engine.CheckpointInterval = 5 * time.Second
			opts.Engine.ResyncInterval = time.Minute
			opts.Engine.Logger = slog.New(slog.DiscardHandler)
			if path := os.Getenv("BENCH_LOG"); path != "" { // a debug log to read timelines from
				f, err := os.Create(path + "." + mode)
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				opts.Engine.Logger = slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
			}
			sup := runSupervisor(b, client, reg, opts)
			for sup.SupervisorStats().Watched < nDBs {
				time.Sleep(50 * time.Millisecond)
			}
			if got := sup.Mode(); got != mode {
				b.Fatalf("discovery mode %q, want %q", got, mode)
			}

			stopConns := make(chan struct{})
			var maxConns atomic.Int64
			var sampler sync.WaitGroup
			sampler.Go(func() {
				port := urlPort(b, serverURL)
				for {
					maxConns.Store(max(maxConns.Load(), int64(socketsTo(port))))
					select {
					case <-stopConns:
						return
					case <-time.After(100 * time.Millisecond):
					}
				}
			})
			scans0 := sup.SupervisorStats().Scans

			b.ResetTimer()
			tick := time.NewTicker(time.Second / time.Duration(rate))
			for i := range b.N {
				<-tick.C
				db := client.DB(fmt.Sprintf("%s-%04d", prefix, rand.IntN(nDBs)))
				id := fmt.Sprintf("r%d-%06d", round, i)
				if _, err := db.Put(context.Background(), id, map[string]any{"type": "job", "state": "new"}); err != nil {
					b.Fatal(err)
				}
				mu.Lock()
				acked[db.Name()+"/"+id] = time.Now()
				mu.Unlock()
			}
			tick.Stop()
			deadline := time.Now().Add(5*interval + time.Minute)
			for handled.Load() < int64(b.N) {
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d documents handled", handled.Load(), b.N)
				}
				time.Sleep(20 * time.Millisecond)
			}
			b.StopTimer()
			close(stopConns)
			sampler.Wait()

			st := sup.SupervisorStats()
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			mu.Lock()
			slices.Sort(lat)
			p := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) / 1000 }
			b.ReportMetric(p(0.5), "detect-p50-ms")
			b.ReportMetric(p(0.99), "detect-p99-ms")
			b.ReportMetric(p(1), "detect-max-ms")
			mu.Unlock()
			b.ReportMetric(float64(interval.Milliseconds()), "interval-ms")
			b.ReportMetric(float64(st.Scans-scans0), "listings")
			b.ReportMetric(float64(st.MaxOpen), "max-open")
			b.ReportMetric(float64(maxConns.Load()), "max-conns")
			b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "heap-MiB")
			b.ReportMetric(float64(ms.HeapAlloc)/float64(nDBs)/1024, "heap-KiB/db")
			if st.MaxOpen > int64(opts.MaxOpen) {
				b.Fatalf("%d engines open at once, cap %d", st.MaxOpen, opts.MaxOpen)
			}
		})
	}
}

func urlPort(b *testing.B, raw string) int {
	u, err := url.Parse(raw)
	if err != nil {
		b.Fatal(err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		b.Fatalf("server URL %q has no port", raw)
	}
	return port
}

// socketsTo counts this process's established TCP connections to port on
// loopback: the socket inodes among /proc/self/fd matched against
// /proc/net/tcp{,6}. Linux only; 0 elsewhere.
func socketsTo(port int) int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	mine := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			mine[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	want := fmt.Sprintf(":%04X", port)
	n := 0
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "01" {
				continue
			}
			if strings.HasSuffix(fields[2], want) && mine[fields[9]] {
				n++
			}
		}
		_ = f.Close()
	}
	return n
}
