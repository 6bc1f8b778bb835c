package channels_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/channels"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// BenchmarkUserChannels asks for channels by replication at scale, on one
// daemon in many-database mode: BENCH_USERS owners (default 300), each with
// a control database holding two active devices, write BENCH_CHANNELS
// (default 3) channel requests each, every channel shared with one other
// owner, all at once; a supervisor over userctl-* (through the
// /_db_updates front, as on CouchDB) answers them. It reports the time from
// a request's write to the member's subscription in the member's own
// control database (p50/p99) for that burst, and for a trickle of
// BENCH_TRICKLE (default 20) requests written one every 500 ms afterwards,
// the channels handled per second, the revisions written per channel per
// hour once idle (BENCH_IDLE_S seconds watched after 3 s to settle,
// default 10, rechecks every second), the daemon's heap per owner and per channel, and the server's
// raw PUT rate at 16 writers in the same run. Run with -benchtime 1x:
//
//	BENCH_USERS=5000 go test -run '^$' -bench UserChannels -benchtime 1x -timeout 60m ./channels/
func BenchmarkUserChannels(b *testing.B) {
	users, perUser := benchEnv(b, "BENCH_USERS", 300), benchEnv(b, "BENCH_CHANNELS", 3)
	idle := time.Duration(benchEnv(b, "BENCH_IDLE_S", 10)) * time.Second
	front := couchtest.NewDBUpdatesServer(b)
	admin := front.Client(b)
	ctx := context.Background()
	control := couchtest.NewDB(b, admin)
	raw := rawPuts(b, couchtest.NewDB(b, admin), 2000, 16)

	var tagb [4]byte
	_, _ = rand.Read(tagb[:])
	tag := hex.EncodeToString(tagb[:])
	owners := make([]string, users)
	for i := range owners {
		owners[i] = fmt.Sprintf("bench-%s-%d@example.com", tag, i)
	}
	parallel(b, users, 16, func(i int) error {
		name := devices.UserDBName(owners[i])
		if err := admin.CreateDB(ctx, name); err != nil {
			return err
		}
		db := admin.DB(name)
		for d := range 2 {
			id := fmt.Sprintf("device:bench-%s-%d-%d", tag, i, d)
			if _, err := db.Put(ctx, id, map[string]any{"type": devices.DeviceInfoType, "state": devices.StateActive}); err != nil {
				return err
			}
		}
		return nil
	})
	b.Cleanup(func() {
		parallel(b, users, 16, func(i int) error {
			_ = admin.DestroyDB(context.Background(), devices.UserDBName(owners[i]))
			return nil
		})
	})

	c0, err := channels.New(channels.Options{Client: admin, DB: control, Prefix: prefixFor(control)})
	if err != nil {
		b.Fatal(err)
	}
	// The member of owner i's channel k is owner i+1; requested is when
	// its request was written, by the channel's database.
	member := map[string]string{}
	for i := range users {
		for k := range perUser {
			member[c0.UserChannelDB(devices.OwnerRole(owners[i]), fmt.Sprintf("c%d", k))] = devices.OwnerRole(owners[(i+1)%users])
		}
	}
	var mu sync.Mutex
	requested := map[string]time.Time{}
	var lat []time.Duration
	var last time.Time
	want, allDone := users*perUser, make(chan struct{})
	ch, err := channels.New(channels.Options{Client: admin, DB: control, Prefix: prefixFor(control),
		ReconcileInterval: time.Second, Logger: benchLogger(),
		OnSubscribed: func(role, database string) {
			mu.Lock()
			defer mu.Unlock()
			at, ok := requested[database]
			if !ok || member[database] != role {
				return
			}
			delete(requested, database)
			last = time.Now()
			lat = append(lat, last.Sub(at))
			if len(lat) == want {
				close(allDone)
			}
		}})
	if err != nil {
		b.Fatal(err)
	}
	reg := workflow.NewRegistry()
	if err := ch.RegisterUserDBs(reg); err != nil {
		b.Fatal(err)
	}
	heapBefore := heapInUse()
	sup, err := supervisor.New(admin, reg, supervisor.Options{
		// The default discovery interval, as deployed: with /_db_updates its
		// full listing (an info request per owner database) runs every 10
		// intervals, which at 1s cost 100 requests/s per 1,000 owners.
		Patterns: []string{devices.UserDBPrefix + "*"}, DiscoveryInterval: discoveryInterval(),
		Engine: workflow.Options{Logger: benchLogger()},
	})
	if err != nil {
		b.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	stopped := make(chan error, 1)
	go func() { stopped <- sup.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-stopped; err != nil {
			b.Error(err)
		}
	}()

	b.ResetTimer()
	began := time.Now()
	parallel(b, users, 16, func(i int) error {
		db := admin.DB(devices.UserDBName(owners[i]))
		for k := range perUser {
			slug := fmt.Sprintf("c%d", k)
			mu.Lock()
			requested[c0.UserChannelDB(devices.OwnerRole(owners[i]), slug)] = time.Now()
			mu.Unlock()
			if _, err := db.Put(ctx, "channel_request:"+slug, map[string]any{
				"type": channels.RequestType, "state": "new", "action": channels.ActionCreate,
				"channel": slug, "name": "Channel " + slug, "members": []string{owners[(i+1)%users]},
			}); err != nil {
				return err
			}
		}
		return nil
	})
	select {
	case <-allDone:
	case <-time.After(30 * time.Minute):
		mu.Lock()
		b.Fatalf("%d of %d subscriptions after 30m", len(lat), users*perUser)
	}
	b.StopTimer()
	mu.Lock()
	elapsed := last.Sub(began)
	slices.Sort(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	mu.Unlock()
	heapAfter := heapInUse()
	if os.Getenv("BENCH_VERBOSE") != "" {
		b.Logf("supervisor: %+v; latencies %v .. %v", sup.SupervisorStats(), lat[:min(5, len(lat))], lat[max(0, len(lat)-5):])
	}

	seqs := func() int {
		var dbs []string
		for i := range users {
			dbs = append(dbs, devices.UserDBName(owners[i]))
		}
		dbs = append(dbs, control.Name())
		var total int
		var tmu sync.Mutex
		parallel(b, len(dbs), 16, func(i int) error {
			st, err := admin.DB(dbs[i]).Stats(ctx)
			if err != nil {
				return err
			}
			n, _ := strconv.Atoi(strings.SplitN(st.UpdateSeq, "-", 2)[0])
			tmu.Lock()
			total += n
			tmu.Unlock()
			return nil
		})
		return total
	}
	// The last answers (the requests' own outcomes) are still being
	// written when the last subscription is: let them land first.
	time.Sleep(3 * time.Second)
	idleFrom := seqs()
	time.Sleep(idle)
	idleRevs := seqs() - idleFrom
	n := users * perUser

	// A trickle: one request at a time on a quiet daemon, most of whose
	// engines have stopped, which is what one device meets.
	trickle := benchEnv(b, "BENCH_TRICKLE", 20)
	mu.Lock()
	lat, want, allDone = nil, trickle, make(chan struct{})
	done := allDone
	mu.Unlock()
	for j := range trickle {
		i := (j * 7919) % users
		slug := fmt.Sprintf("t%d", j)
		database := c0.UserChannelDB(devices.OwnerRole(owners[i]), slug)
		mu.Lock()
		member[database] = devices.OwnerRole(owners[(i+1)%users])
		requested[database] = time.Now()
		mu.Unlock()
		if _, err := admin.DB(devices.UserDBName(owners[i])).Put(ctx, "channel_request:"+slug, map[string]any{
			"type": channels.RequestType, "state": "new", "action": channels.ActionCreate,
			"channel": slug, "name": "Trickle " + slug, "members": []string{owners[(i+1)%users]},
		}); err != nil {
			b.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("trickle: %d of %d subscriptions after 5m", len(lat), trickle)
	}
	mu.Lock()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "trickle-p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Milliseconds()), "trickle-p99-ms")
	mu.Unlock()
	b.ReportMetric(float64(p50.Milliseconds()), "burst-p50-ms")
	b.ReportMetric(float64(p99.Milliseconds()), "burst-p99-ms")
	b.ReportMetric(float64(n)/elapsed.Seconds(), "channels/s")
	b.ReportMetric(raw, "raw-put/s")
	b.ReportMetric(float64(idleRevs)/float64(n)*float64(time.Hour)/float64(idle), "idle-revs/ch/h")
	b.ReportMetric(float64(heapAfter-heapBefore)/1024/float64(users), "heap-KiB/user")
	b.ReportMetric(float64(heapAfter-heapBefore)/1024/float64(n), "heap-KiB/ch")
}

// discoveryInterval is the supervisor's default (10s), or 1s with
// BENCH_TEST_INTERVALS=1 (the first figures' setting).
func discoveryInterval() time.Duration {
	if os.Getenv("BENCH_TEST_INTERVALS") != "" {
		return time.Second
	}
	return 0
}

func benchEnv(b *testing.B, name string, def int) int {
	b.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 1 {
		b.Fatalf("%s=%q: want a positive number", name, s)
	}
	return v
}

// parallel runs fn(0..n-1) on c goroutines and fails b on the first error.
func parallel(b *testing.B, n, c int, fn func(i int) error) {
	b.Helper()
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	var wg sync.WaitGroup
	errs := make(chan error, c)
	for range c {
		wg.Go(func() {
			for i := range work {
				if err := fn(i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
}

// rawPuts is the server's rate of single-document PUTs (new documents) at
// c writers.
func rawPuts(b *testing.B, db *kivik.DB, n, c int) float64 {
	b.Helper()
	began := time.Now()
	parallel(b, n, c, func(i int) error {
		_, err := db.Put(context.Background(), fmt.Sprintf("raw-%06d", i), map[string]any{"type": "raw", "i": i})
		return err
	})
	return float64(n) / time.Since(began).Seconds()
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// benchLogger discards, or shows warnings with BENCH_VERBOSE.
func benchLogger() *slog.Logger {
	if os.Getenv("BENCH_VERBOSE") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
