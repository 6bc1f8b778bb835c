package workflow_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// BenchmarkDaemons measures scale-out on one database: 1, 2, 3 and 4
// engines (daemons) with membership on, each with its own owner and 16
// workers, handle b.N one-step documents written once they see each other.
// It reports each count's docs/s, its ratio to one daemon (x2, x3, x4, the
// same run), the server's raw single-PUT rate at 16 writers, and how many
// runs per document there were (must stay 1 for unsafe):
//
//	go test -run '^$' -bench Daemons -benchtime 2000x ./workflow/
//
// (BENCH_FEED_WITHOUT_BODIES=1: the engines run with FeedWithoutBodies.)
//
// The front case does the same with each daemon on its own node of a
// three-replica cluster emulation (couchtest.ReplicaFront; a fourth daemon
// shares the first node), unsafe documents only, beside the raw PUT rate
// through the front; BENCH_DAEMONS_FRONT_DOCS sets its document count
// (default: b.N).
//
// The takeover case runs three members of which one is killed (it stops
// renewing its lease, as a crashed process does) right after the documents
// are written, and reports the seconds until the others handled its share
// (takeover-s) beside the member lease (lease-s).
func BenchmarkDaemons(b *testing.B) {
	for _, mode := range []workflow.Mode{workflow.Safe, workflow.Unsafe} {
		b.Run(mode.String(), func(b *testing.B) {
			client := couchtest.Client(b)
			raw := rawPutRate(b, couchtest.NewDB(b, client), b.N, 16)
			rates := map[int]float64{}
			for d := 1; d <= 4; d++ {
				rate, perDoc := daemonsRate(b, couchtest.NewDB(b, client), b.N, d, mode)
				rates[d] = rate
				if mode == workflow.Unsafe && perDoc != 1 {
					b.Errorf("%d daemons: %.3f unsafe runs per document, want 1", d, perDoc)
				}
			}
			reportDaemonRates(b, rates, raw, "raw-put/s")
		})
	}
	b.Run("front-unsafe", func(b *testing.B) {
		n := envInt(b, "BENCH_DAEMONS_FRONT_DOCS", b.N)
		raw := rawPutRate(b, couchtest.NewReplicaFront(b, couchtest.ReplicaOptions{}).DB(b, 0), min(n, 2000), 16)
		rates := map[int]float64{}
		for d := 1; d <= 4; d++ {
			front := couchtest.NewReplicaFront(b, couchtest.ReplicaOptions{})
			rate, perDoc := daemonsRateOn(b, func(i int) *kivik.DB { return front.DB(b, i%3) }, n, d, workflow.Unsafe)
			rates[d] = rate
			if perDoc != 1 {
				b.Errorf("%d daemons through the front: %.3f unsafe runs per document, want 1", d, perDoc)
			}
		}
		reportDaemonRates(b, rates, raw, "front-raw-put/s")
	})
	b.Run("takeover", func(b *testing.B) {
		lease := 5 * time.Second
		took := takeover(b, couchtest.NewDB(b, couchtest.Client(b)), b.N, lease)
		b.ReportMetric(took.Seconds(), "takeover-s")
		b.ReportMetric(lease.Seconds(), "lease-s")
	})
}

// reportDaemonRates reports each daemon count's rate, its ratio to one
// daemon, and the raw rate under rawUnit. Reported last: ResetTimer, which
// each case calls, clears metrics reported before it.
func reportDaemonRates(b *testing.B, rates map[int]float64, raw float64, rawUnit string) {
	for d := 1; d <= 4; d++ {
		b.ReportMetric(rates[d], fmt.Sprintf("d%d-docs/s", d))
	}
	for d := 2; d <= 4; d++ {
		b.ReportMetric(rates[d]/rates[1], fmt.Sprintf("x%d", d))
	}
	b.ReportMetric(raw, rawUnit)
}

// daemonsRate runs d member engines on db, writes n documents once they see
// each other, and returns docs/s from the first write to the last result,
// and handler runs per document.
func daemonsRate(b *testing.B, db *kivik.DB, n, d int, mode workflow.Mode) (float64, float64) {
	return daemonsRateOn(b, func(int) *kivik.DB { return db }, n, d, mode)
}

// daemonsRateOn is daemonsRate with daemon i on dbOf(i), every one of them
// the same database (endpoints of one cluster, say).
func daemonsRateOn(b *testing.B, dbOf func(i int) *kivik.DB, n, d int, mode workflow.Mode) (float64, float64) {
	b.Helper()
	db := dbOf(0)
	runs := newCounter()
	var engines []*workflowtest.Running
	for i := range d {
		reg := workflow.NewRegistry()
		reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: mode, Handler: oneStep(runs, "done")})
		opts := workflowtest.Options(b)
		opts.Workers = 16
		opts.Members = true
		// The production default (30s): with a lease of a few seconds a
		// renewal slowed by the load itself (through the replica front,
		// over a second) lets the others count a member out and back in,
		// and each change of the live set moves ids mid-run (rescans,
		// claim races). The takeover case measures a short lease.
		opts.MemberLease = 30 * time.Second
		opts.Owner = fmt.Sprintf("bench-member-%d", i)
		// Production's intervals: with the tests' 300ms resync each
		// daemon makes the server scan the whole database (a Mango query
		// without index) three times a second, which alone made more
		// daemons slower.
		opts.CheckpointInterval = 5 * time.Second
		opts.ResyncInterval = time.Minute
		opts.NoStartScan = true
		opts.FeedWithoutBodies = os.Getenv("BENCH_FEED_WITHOUT_BODIES") == "1"
		engines = append(engines, workflowtest.Start(b, dbOf(i), reg, opts))
	}
	workflowtest.Eventually(b, 30*time.Second, "members see each other", func() (bool, string) {
		for _, e := range engines {
			if e.Stats().Members != int64(d) {
				return false, fmt.Sprint(e.Stats().Members)
			}
		}
		return true, ""
	})
	b.ResetTimer()
	startAt := time.Now()
	putDocs(b, db, "job", n, "job", "new", nil)
	workflowtest.Eventually(b, 10*time.Minute, "all handled", func() (bool, string) {
		var done int64
		for _, e := range engines {
			done += e.Stats().Transitions
		}
		return done >= int64(n), fmt.Sprintf("%d of %d", done, n)
	})
	elapsed := time.Since(startAt)
	b.StopTimer()
	// Where the server's requests went: on the test server each costs
	// about 3 ms of its CPU before its rows.
	var feeds, fetches, batches, writes, renewed, rebalances, lost, held int64
	for _, e := range engines {
		st := e.Stats()
		feeds, fetches, batches, writes = feeds+st.FeedRequests, fetches+st.BodyFetches, batches+st.Batches, writes+st.BatchedWrites
		renewed, rebalances, lost, held = renewed+st.ClaimsRenewed, rebalances+st.Rebalances, lost+st.ClaimsLost, held+st.ClaimsHeld
	}
	per := func(v int64) float64 { return 1000 * float64(v) / float64(n) }
	b.Logf("%d daemons, %s: %.0f docs/s; per 1,000 documents %.1f feed requests, %.1f body fetches, %.1f group commits "+
		"of %.1f writes on average, %.1f renewals, %.1f claims lost, %.1f held by another; %d rebalances",
		d, mode, float64(n)/elapsed.Seconds(), per(feeds), per(fetches), per(batches), float64(writes)/float64(max(batches, 1)),
		per(renewed), per(lost), per(held), rebalances)
	var wg sync.WaitGroup
	for _, e := range engines {
		wg.Go(func() { stop(b, e) })
	}
	wg.Wait()
	return float64(n) / elapsed.Seconds(), float64(runs.total()) / float64(n)
}

// takeover runs two live members and one that is killed as the documents
// are written, and returns the time from its kill to the end of its share.
func takeover(b *testing.B, db *kivik.DB, n int, lease time.Duration) time.Duration {
	b.Helper()
	ctx := context.Background()
	runs := newCounter()
	// The killed member: its document as its last renewal left it.
	killedAt := time.Now()
	if _, err := db.Put(ctx, "docstate-member:docstate:bench-killed", map[string]any{
		"type": "docstate-member", "engine": "docstate", "owner": "bench-killed",
		"expires": killedAt.Add(lease).UTC().Format(time.RFC3339Nano), "joined": killedAt.UTC().Format(time.RFC3339Nano),
	}); err != nil {
		b.Fatal(err)
	}
	var engines []*workflowtest.Running
	for i := range 2 {
		reg := workflow.NewRegistry()
		reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Unsafe, Handler: oneStep(runs, "done")})
		opts := workflowtest.Options(b)
		opts.Workers = 16
		opts.Members = true
		opts.MemberLease = lease
		opts.ResyncInterval = time.Minute // the membership rescan, not the due scan, must find the share
		opts.Owner = fmt.Sprintf("bench-live-%d", i)
		opts.NoStartScan = true
		engines = append(engines, workflowtest.Start(b, db, reg, opts))
	}
	workflowtest.Eventually(b, lease, "three members seen", func() (bool, string) {
		return engines[0].Stats().Members == 3 && engines[1].Stats().Members == 3, ""
	})
	b.ResetTimer()
	putDocs(b, db, "job", n, "job", "new", nil)
	workflowtest.Eventually(b, 5*time.Minute, "all handled", func() (bool, string) {
		st := states(b, db)
		return st["done"] == n, fmt.Sprint(st)
	})
	took := time.Since(killedAt)
	b.StopTimer()
	if runs.total() != n {
		b.Errorf("%d unsafe runs for %d documents", runs.total(), n)
	}
	for _, e := range engines {
		stop(b, e)
	}
	return took
}
