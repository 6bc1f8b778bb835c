package workflow_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
	kivik "github.com/go-kivik/kivik/v4"
)

// ledger is an unsafe handler's side effects: one line per run, with the
// owner that ran it and whether the run took over an expired claim.
type ledger struct {
	mu    sync.Mutex
	lines map[string][]ledgerLine
}

type ledgerLine struct {
	owner, key string
	takeover   bool
}

func (l *ledger) add(doc *workflow.Doc) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lines == nil {
		l.lines = map[string][]ledgerLine{}
	}
	l.lines[doc.ID] = append(l.lines[doc.ID], ledgerLine{doc.Claim.Owner, doc.Claim.Key, doc.Claim.Takeover})
}

// runs returns the number of lines, the documents that two different
// owners ran as the winners of a claim (each believing no one else did:
// neither run a takeover), and the takeovers of expired claims (a second
// run under the same key, the documented path after a lost owner).
func (l *ledger) runs() (total int, doubles []string, takeovers int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, lines := range l.lines {
		total += len(lines)
		owners := map[string]bool{}
		for _, ln := range lines {
			if ln.takeover {
				takeovers++
				continue
			}
			owners[ln.owner] = true
		}
		if len(owners) > 1 {
			doubles = append(doubles, fmt.Sprintf("%s %v", id, lines))
		}
	}
	return total, doubles, takeovers
}

// replicaFault is what happens to the cluster while the documents run.
type replicaFault int

const (
	noFault replicaFault = iota
	replicaRestart
	nodeKilled
)

// TestReplicasEnginesOnThreeNodesRunEachClaimOnce runs three engines, each
// on its own node of a three-replica cluster (couchtest.ReplicaFront),
// without membership so that all three race for every unsafe document.
// Racing claim writes reach the replicas in different orders, are answered
// 201 or 202 by quorum, and meet as stored conflicts by internal
// replication. With no fault, with a replica stopped and restarted
// mid-run, and with a node (endpoint and replica) killed mid-run: no
// document may be run by two owners as a claim's winner, every document
// must be sent, and no conflict may be left on any live replica.
func TestReplicasEnginesOnThreeNodesRunEachClaimOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault replicaFault
	}{{"no fault", noFault}, {"replica restarted", replicaRestart}, {"node killed", nodeKilled}} {
		t.Run(tc.name, func(t *testing.T) {
			const n = 150
			res := replicaRun(t, n, tc.fault, false, 0)
			t.Logf("%d docs: %d runs, %d takeovers; front: %d requests, %d answered 202, %d revisions copied, %d feed rewinds; claims won %d, unproven %d (proven %d, yielded %d), branches removed %d; %v",
				n, res.runs, res.takeovers, res.requests, res.accepted, res.copied, res.rewinds,
				res.stats.ClaimsWon, res.stats.ClaimsUnproven, res.stats.ClaimsProven, res.stats.ClaimsYielded, res.stats.BranchesRemoved, res.took)
			if len(res.doubles) > 0 {
				t.Errorf("%d documents run by two owners, e.g. %v", len(res.doubles), res.doubles[0])
			}
			if res.accepted == 0 && res.stats.ClaimsLost == 0 {
				t.Fatal("no write was answered 202 and no claim race was lost: the test proved nothing")
			}
		})
	}
}

// replicaResult is what one replicaRun saw.
type replicaResult struct {
	runs, takeovers                     int
	doubles                             []string
	requests, accepted, copied, rewinds int64
	stats                               workflow.Stats
	took                                time.Duration
}

// replicaRun moves n unsafe documents new → sent with three engines on the
// three nodes of a ReplicaFront, with fault injected once a third of them
// are sent, and checks that all are sent and no replica holds a conflict.
func replicaRun(t testing.TB, n int, fault replicaFault, members bool, batch int) replicaResult {
	front := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{})
	book := &ledger{}
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		// A lease long enough that a slow shared test server does not
		// expire live claims; the killed node's claims end with it.
		Timeout: 5 * time.Second, Lease: 15 * time.Second, OnExpired: workflow.RetryExpired,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			book.add(doc)
			return workflow.Transition("sent").Set("message_id", doc.Claim.Key), nil
		})})
	var engines []*workflowtest.Running
	for i, owner := range []string{"engine-a", "engine-b", "engine-c"} {
		opts := workflowtest.Options(t)
		opts.Owner = owner
		opts.Members = members
		opts.MemberLease = 3 * time.Second
		opts.BatchSize = batch
		// The killed node's engine cannot write anything back; its stop
		// must not wait long for it.
		opts.DrainTimeout = time.Second
		engines = append(engines, workflowtest.Start(t, front.DB(t, i), reg, opts))
	}
	db := front.DB(t, 0)
	// A quiet longpoll never answers on the test server: a foreign
	// document shows that every feed is up before the documents come.
	if _, err := db.Put(context.Background(), "warm-up", map[string]any{"note": "not a workflow document"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 30*time.Second, "feeds up", func() (bool, string) {
		for _, e := range engines {
			if st := e.Stats(); st.ChangesReceived == 0 || members && st.Members < 3 {
				return false, fmt.Sprintf("changes %d, members %d", st.ChangesReceived, st.Members)
			}
		}
		return true, ""
	})
	began := time.Now()
	putDocs(t, db, "mail", n, "mail", "new", nil)
	// Reads go through a node that stays up.
	check := front.DB(t, 2)
	faulted := fault == noFault
	// Racing without group commit through the front runs at about 10
	// documents a second here: the bound grows with n.
	workflowtest.Eventually(t, max(5*time.Minute, time.Duration(n)*200*time.Millisecond), "all sent", func() (bool, string) {
		st := states(t, check)
		if !faulted && st["sent"] >= n/3 {
			faulted = true
			switch fault {
			case replicaRestart:
				front.StopReplica(1)
				time.AfterFunc(2*time.Second, func() { front.StartReplica(1) })
			case nodeKilled:
				front.KillNode(0)
			}
		}
		msg := fmt.Sprint(st)
		if st["new"] > 0 && time.Since(began) > 60*time.Second {
			msg += "; " + stuckDoc(t, front, check)
		}
		return st["sent"] == n, msg
	})
	took := time.Since(began)
	if fault == replicaRestart {
		// The restart is a timer; the replica is up by now or soon.
		time.Sleep(2 * time.Second)
	}
	// Membership leases are rewritten every second while the engines run;
	// they are not what this test is about.
	front.WaitConverged(t, 60*time.Second, "docstate-member:")
	live := []int{0, 1, 2}
	if fault == nodeKilled {
		live = []int{1, 2}
	}
	// After a node is killed its engine's live claims stay on losing
	// branches until their lease ends; the engine that saw such a branch
	// reads every leaf when it looks again (Engine.hidden) and resolves
	// it then, within the lease (15s) and a second.
	resolvedOn := live
	workflowtest.Eventually(t, 60*time.Second, "no conflicts left", func() (bool, string) {
		left := 0
		for _, i := range resolvedOn {
			left += conflicted(t, front.Replica(t, i))
		}
		msg := fmt.Sprint(left, " conflicted")
		if left > 0 {
			msg += "; e.g. " + showConflicted(t, front.Replica(t, resolvedOn[0]))
		}
		return left == 0, msg
	})
	for _, i := range live {
		if st := states(t, front.Replica(t, i)); st["sent"] != n {
			t.Fatalf("replica %d: %v, want %d sent", i, st, n)
		}
	}
	var s workflow.Stats
	for _, e := range engines {
		es := e.Stats()
		s.ClaimsWon += es.ClaimsWon
		s.ClaimsLost += es.ClaimsLost
		s.ClaimsUnproven += es.ClaimsUnproven
		s.ClaimsProven += es.ClaimsProven
		s.ClaimsYielded += es.ClaimsYielded
		s.BranchesRemoved += es.BranchesRemoved
		s.ClaimsTakenOver += es.ClaimsTakenOver
	}
	for _, e := range engines {
		e.Stop(t)
	}
	runs, doubles, takeovers := book.runs()
	return replicaResult{runs: runs, doubles: doubles, takeovers: takeovers, requests: front.Requests(),
		accepted: front.Accepted(), copied: front.Copied(), rewinds: front.Rewinds(), stats: s, took: took}
}

// stuckDoc shows one document still new, as each replica holds it.
func stuckDoc(t testing.TB, front *couchtest.ReplicaFront, db *kivik.DB) string {
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	for rows.Next() {
		var s stored
		if rows.ScanDoc(&s) != nil || s.State != "new" {
			continue
		}
		out := s.ID + ":"
		for i := range 3 {
			var raw json.RawMessage
			err := front.Replica(t, i).Get(context.Background(), s.ID, kivik.Param("open_revs", "all")).ScanDoc(&raw)
			out += fmt.Sprintf("\n r%d %s %v", i, raw, err)
		}
		return out
	}
	return ""
}
