package workflow_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/docstate/docstate/internal/couchtest"
)

// BenchmarkReplicas runs three engines, each on its own node of a
// three-replica cluster emulation (couchtest.ReplicaFront: quorum writes
// answered 201/202, internal replication, r=2 reads), on
// BENCH_REPLICAS_DOCS (default 1000) unsafe documents, with membership on
// (each engine takes its share) and off (all three race for every
// document). It reports the unsafe rate beside the raw PUT rate through
// the same front and straight to the test server, the requests the
// engines sent to the front per unsafe run, and fails if any document ran
// under two owners or a conflict is left on a replica:
//
//	go test -run '^$' -bench '^BenchmarkReplicas$' -benchtime 1x ./workflow/
//
// BENCH_REPLICAS_FAULT=restart stops a replica for 2s once a third of the
// documents are sent, =kill kills a node (endpoint and replica) then;
// BENCH_REPLICAS_BATCH=1 turns group commit off (every claim a single PUT).
func BenchmarkReplicas(b *testing.B) {
	fault := noFault
	switch f := os.Getenv("BENCH_REPLICAS_FAULT"); f {
	case "", "none":
	case "restart":
		fault = replicaRestart
	case "kill":
		fault = nodeKilled
	default:
		b.Fatalf("BENCH_REPLICAS_FAULT=%q: want none, restart or kill", f)
	}
	for _, members := range []bool{true, false} {
		b.Run(fmt.Sprintf("members=%v", members), func(b *testing.B) {
			n := envInt(b, "BENCH_REPLICAS_DOCS", 1000)
			batch := envInt(b, "BENCH_REPLICAS_BATCH", 0) // 0: the default
			raw := rawPutRate(b, couchtest.NewDB(b, couchtest.Client(b)), min(n, 2000), 16)
			rawFront := rawPutRate(b, couchtest.NewReplicaFront(b, couchtest.ReplicaOptions{}).DB(b, 0), min(n, 2000), 16)
			res := replicaRun(b, n, fault, members, batch)
			rate := float64(n) / res.took.Seconds()
			b.ReportMetric(raw, "raw-put/s")
			b.ReportMetric(rawFront, "front-raw-put/s")
			b.ReportMetric(rate, "front-unsafe/s")
			b.ReportMetric(float64(res.runs), "runs")
			b.ReportMetric(float64(res.takeovers), "takeovers")
			b.ReportMetric(float64(len(res.doubles)), "double-runs")
			b.ReportMetric(float64(res.accepted), "answered-202")
			b.ReportMetric(float64(res.stats.ClaimsUnproven), "claims-unproven")
			b.ReportMetric(float64(res.stats.ClaimsYielded), "claims-yielded")
			b.ReportMetric(float64(res.stats.BranchesRemoved), "branches-removed")
			b.ReportMetric(float64(res.requests)/float64(max(res.runs, 1)), "front-req/run")
			if len(res.doubles) > 0 {
				b.Fatalf("%d documents run by two owners, e.g. %v", len(res.doubles), res.doubles[0])
			}
		})
	}
}
