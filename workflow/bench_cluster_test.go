package workflow_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// BenchmarkCluster runs three engines on BENCH_CLUSTER_DOCS (default 3000)
// unsafe documents, with membership on (the default: each engine takes its
// share) and off (all three race for every document), first each straight on the test server,
// then each through its own endpoint of the cluster front
// (couchtest.ClusterFront), which stores every losing claim as a conflict
// answered 202 and answers one in three other claim writes 202, as a CouchDB
// 3 cluster may. It reports both rates and their ratio, with the raw PUT
// rate of the same run, and fails if any document ran under two owners or
// any conflict is left. Three runs of 3,000 documents:
//
//	go test -run '^$' -bench '^BenchmarkCluster$' -benchtime 1x -count 3 ./workflow/
func BenchmarkCluster(b *testing.B) {
	for _, members := range []bool{true, false} {
		b.Run(fmt.Sprintf("members=%v", members), func(b *testing.B) {
			n := envInt(b, "BENCH_CLUSTER_DOCS", 3000)
			admin := couchtest.Client(b)
			raw := rawPutRate(b, couchtest.NewDB(b, admin), min(n, 2000), 16)
			direct, _, _ := clusterCase(b, admin, n, nil, members)
			front := couchtest.NewClusterFront(b, 3)
			front.Split(isClaim)
			var n202 atomic.Int64
			front.Accept(func(id string, body map[string]json.RawMessage) bool {
				return isClaim(id, body) && n202.Add(1)%3 == 0
			})
			through, doubles, left := clusterCase(b, admin, n, front, members)
			b.ReportMetric(raw, "raw-put/s")
			b.ReportMetric(direct, "single-unsafe/s")
			b.ReportMetric(through, "cluster-unsafe/s")
			b.ReportMetric(through/direct, "cluster-x-single")
			b.ReportMetric(float64(front.Splits()), "conflicts-stored")
			b.ReportMetric(float64(front.Accepted()), "answered-202")
			b.ReportMetric(float64(doubles), "double-runs")
			if doubles > 0 || left > 0 {
				b.Fatalf("through the front: %d documents run by two owners, %d conflicted documents left", doubles, left)
			}
		})
	}
}

// clusterCase moves n unsafe documents new → sent with three engines,
// through front's endpoints (nil: straight to the server), and returns the
// rate, the documents run by two owners and the conflicted ones left.
func clusterCase(b *testing.B, admin *kivik.Client, n int, front *couchtest.ClusterFront, members bool) (float64, int, int) {
	b.Helper()
	db := couchtest.NewDB(b, admin)
	runs := &ownerLog{}
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			runs.add(doc.ID, doc.Claim.Owner)
			return workflow.Transition("sent").Set("message_id", doc.Claim.Key), nil
		})})
	var engines []*workflowtest.Running
	for i, owner := range []string{"engine-a", "engine-b", "engine-c"} {
		opts := workflowtest.Options(b)
		opts.Owner = owner
		// Off, every engine races for every document; on (the default),
		// each has its share and races only while membership settles.
		opts.Members = members
		opts.MemberLease = 3 * time.Second
		on := db
		if front != nil {
			on = front.Client(b, i).DB(db.Name())
		}
		engines = append(engines, workflowtest.Start(b, on, reg, opts))
	}
	if _, err := db.Put(context.Background(), "warm-up", map[string]any{"note": "not a workflow document"}); err != nil {
		b.Fatal(err)
	}
	workflowtest.Eventually(b, 30*time.Second, "feeds up", func() (bool, string) {
		for _, e := range engines {
			if st := e.Stats(); st.ChangesReceived == 0 || members && st.Members < 3 {
				return false, fmt.Sprintf("changes %d, members %d", st.ChangesReceived, st.Members)
			}
		}
		return true, ""
	})
	began := time.Now()
	putDocs(b, db, "mail", n, "mail", "new", nil)
	workflowtest.Eventually(b, 20*time.Minute, "all sent", func() (bool, string) {
		st := states(b, db)
		return st["sent"] == n, fmt.Sprint(st)
	})
	rate := float64(n) / time.Since(began).Seconds()
	left := 0
	workflowtest.Eventually(b, 60*time.Second, "no conflicts left", func() (bool, string) {
		left = conflicted(b, db)
		return left == 0, fmt.Sprint(left, " conflicted")
	})
	for _, e := range engines {
		e.Stop(b)
	}
	return rate, len(runs.doubles()), left
}
