package workflow_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// ownerLog records which owners ran each document's unsafe handler.
type ownerLog struct {
	mu sync.Mutex
	by map[string]map[string]int
}

func (l *ownerLog) add(id, owner string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.by == nil {
		l.by = map[string]map[string]int{}
	}
	if l.by[id] == nil {
		l.by[id] = map[string]int{}
	}
	l.by[id][owner]++
}

// doubles returns the documents run by more than one owner.
func (l *ownerLog) doubles() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for id, owners := range l.by {
		if len(owners) > 1 {
			out = append(out, fmt.Sprintf("%s %v", id, owners))
		}
	}
	return out
}

// isClaim reports whether a write carries a live unsafe claim.
func isClaim(_ string, body map[string]json.RawMessage) bool {
	var m struct {
		Claim *workflow.Claim `json:"claim"`
	}
	return json.Unmarshal(body["docstate"], &m) == nil && m.Claim != nil
}

// TestClusterRacingEnginesNeverBothRunAClaim races two engines, each on its
// own endpoint of the cluster front, for the same unsafe documents. The
// front stores the losing claim of every race as a conflicting branch and
// answers it 202, as a cluster does when the two writes reached different
// replicas first, and answers one in three other claim writes 202 as well: both
// sides of a race are acknowledged. No document may be run by two owners,
// and none may be left conflicted.
func TestClusterRacingEnginesNeverBothRunAClaim(t *testing.T) {
	for _, tc := range []struct {
		name  string
		batch int
	}{{"group commit", 0}, {"single writes", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			admin := couchtest.Client(t)
			name := couchtest.NewDB(t, admin).Name()
			front := couchtest.NewClusterFront(t, 2)
			front.Split(isClaim)
			var n202 atomic.Int64
			front.Accept(func(id string, body map[string]json.RawMessage) bool {
				return isClaim(id, body) && n202.Add(1)%3 == 0
			})
			runs := &ownerLog{}
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					runs.add(doc.ID, doc.Claim.Owner)
					time.Sleep(time.Millisecond) // a side effect takes time
					return workflow.Transition("sent").Set("message_id", doc.Claim.Key), nil
				})})
			const n = 100
			db := admin.DB(name)
			var engines []*workflowtest.Running
			for i, owner := range []string{"engine-a", "engine-b"} {
				opts := workflowtest.Options(t)
				opts.Owner = owner
				opts.BatchSize = tc.batch
				engines = append(engines, workflowtest.Start(t, front.Client(t, i).DB(name), reg, opts))
			}
			// The documents arrive once both feeds are listening, so that
			// both engines see every one at once and race for it. A quiet
			// database's longpoll never answers on the test server, so a
			// foreign document shows that both feeds are up.
			if _, err := db.Put(context.Background(), "warm-up", map[string]any{"note": "not a workflow document"}); err != nil {
				t.Fatal(err)
			}
			workflowtest.Eventually(t, 30*time.Second, "both feeds up", func() (bool, string) {
				return engines[0].Stats().ChangesReceived > 0 && engines[1].Stats().ChangesReceived > 0, "waiting"
			})
			ids := putDocs(t, db, "mail", n, "mail", "new", nil)
			workflowtest.Eventually(t, 90*time.Second, "all sent, no conflicts left", func() (bool, string) {
				st := states(t, db)
				c := conflicted(t, db)
				msg := fmt.Sprintf("%v, %d conflicted", st, c)
				if c > 0 {
					msg += "; e.g. " + showConflicted(t, db)
				} else if st["new"] > 0 {
					for _, id := range ids {
						if d := get(t, db, id); d.State == "new" {
							msg += fmt.Sprintf("; e.g. %s %s %s", id, d.Rev, d.MetaRaw)
							break
						}
					}
				}
				return st["sent"] == n && c == 0, msg
			})
			if d := runs.doubles(); len(d) > 0 {
				t.Errorf("%d documents run by two owners, e.g. %v", len(d), d[0])
			}
			var s workflow.Stats
			for _, e := range engines {
				es := e.Stats()
				s.ClaimsWon += es.ClaimsWon
				s.ClaimsUnproven += es.ClaimsUnproven
				s.ClaimsProven += es.ClaimsProven
				s.ClaimsYielded += es.ClaimsYielded
				s.BranchesRemoved += es.BranchesRemoved
				s.ConflictsWaiting += es.ConflictsWaiting
				s.ClaimsTakenOver += es.ClaimsTakenOver
			}
			t.Logf("%d docs: front stored %d conflicts, answered %d writes 202; claims won %d, unproven %d (proven %d, yielded %d); branches removed %d, conflicted documents left for later %d, takeovers %d",
				n, front.Splits(), front.Accepted(), s.ClaimsWon, s.ClaimsUnproven, s.ClaimsProven, s.ClaimsYielded, s.BranchesRemoved, s.ConflictsWaiting, s.ClaimsTakenOver)
			if front.Splits() == 0 {
				t.Fatal("no claim race reached the front: the test proved nothing")
			}
			if s.BranchesRemoved == 0 {
				t.Fatal("conflicts were stored but no branch was removed")
			}
		})
	}
}

// showConflicted returns every branch of one conflicted document.
func showConflicted(t testing.TB, db *kivik.DB) string {
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true), kivik.Param("conflicts", true))
	defer rows.Close()
	for rows.Next() {
		var d struct {
			ID        string   `json:"_id"`
			Rev       string   `json:"_rev"`
			Conflicts []string `json:"_conflicts"`
		}
		if err := rows.ScanDoc(&d); err != nil || len(d.Conflicts) == 0 {
			continue
		}
		out := d.ID + ": "
		rs := db.OpenRevs(context.Background(), d.ID, append([]string{d.Rev}, d.Conflicts...))
		for rs.Next() {
			var raw json.RawMessage
			_ = rs.ScanDoc(&raw)
			out += string(raw) + "\n"
		}
		rs.Close()
		return out
	}
	return ""
}

// conflicted counts documents with stored conflicts.
func conflicted(t testing.TB, db *kivik.DB) int {
	t.Helper()
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true), kivik.Param("conflicts", true))
	defer rows.Close()
	n := 0
	for rows.Next() {
		var d struct {
			Conflicts []string `json:"_conflicts"`
		}
		if err := rows.ScanDoc(&d); err == nil && len(d.Conflicts) > 0 {
			n++
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("all docs: %v", err)
	}
	return n
}

// TestStoredConflictResolvedAndCountsNeverGoDown gives the engine a
// document with a stored conflict: the branch CouchDB may show holds less
// bookkeeping than the other, which holds an expired claim of a crashed
// owner after two failed attempts. The engine must remove the losing
// branch, keep the larger counts and the expired claim's key, and apply the
// expiry policy to it (a takeover), whichever branch CouchDB picked.
func TestStoredConflictResolvedAndCountsNeverGoDown(t *testing.T) {
	ctx := context.Background()
	db := couchtest.NewDB(t, couchtest.Client(t))
	rev1, err := db.Put(ctx, "x", map[string]any{"type": "mail", "state": "new"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Put(ctx, "x", map[string]any{"_rev": rev1, "type": "mail", "state": "new",
		"docstate": map[string]any{"state": "new", "claims": 1}}); err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-time.Minute).UTC().Format("2006-01-02T15:04:05.000Z")
	branch := map[string]any{"_id": "x", "_rev": "2-ffffffffffffffffffffffffffffffff", "type": "mail", "state": "new",
		"_revisions": map[string]any{"start": 2, "ids": []string{"ffffffffffffffffffffffffffffffff", rev1[2:]}},
		"docstate": map[string]any{"state": "new", "claims": 3, "attempts": 2, "key": "x/new/1", "due": past,
			"claim": map[string]any{"owner": "gone", "expires": past, "attempt": 3, "key": "x/new/1"}}}
	if _, err := db.BulkDocs(ctx, []any{branch}, kivik.Param("new_edits", false)); err != nil {
		t.Fatal(err)
	}
	if conflicted(t, db) != 1 {
		t.Fatal("the test server did not store the conflict")
	}
	var seen atomic.Value
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe, MaxAttempts: 10,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			seen.Store(fmt.Sprintf("attempt %d, claim %d, key %s", doc.Attempt, doc.Claim.Attempt, doc.Claim.Key))
			return workflow.Transition("sent"), nil
		})})
	eng := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 30*time.Second, "sent", func() (bool, string) {
		d := get(t, db, "x")
		return d.State == "sent", fmt.Sprint(d.State)
	})
	if c := conflicted(t, db); c != 0 {
		t.Fatalf("%d documents still conflicted", c)
	}
	// Two failed attempts and the expired claim's (the takeover's) make
	// three before this run; claims 3 before, so this claim is the 4th.
	if got, want := seen.Load(), "attempt 4, claim 4, key x/new/1"; got != want {
		t.Fatalf("handler saw %v, want %s", got, want)
	}
	if s := eng.Stats(); s.BranchesRemoved != 1 || s.ClaimsTakenOver != 1 {
		t.Fatalf("branches removed %d, takeovers %d; want 1 and 1", s.BranchesRemoved, s.ClaimsTakenOver)
	}
}

// TestSingleServerClaimsNeedNoProof checks the cost promise: the test
// server answers every write 201, so no claim needs a proof, with group
// commit on or off.
func TestSingleServerClaimsNeedNoProof(t *testing.T) {
	for _, batch := range []int{0, 1} {
		db := couchtest.NewDB(t, couchtest.Client(t))
		reg := workflow.NewRegistry()
		reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
			Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
				return workflow.Transition("sent"), nil
			})})
		const n = 50
		putDocs(t, db, "mail", n, "mail", "new", nil)
		opts := workflowtest.Options(t)
		opts.BatchSize = batch
		eng := workflowtest.Start(t, db, reg, opts)
		workflowtest.Eventually(t, 30*time.Second, "all sent", func() (bool, string) {
			st := states(t, db)
			return st["sent"] == n, fmt.Sprint(st)
		})
		if s := eng.Stats(); s.ClaimsWon != n || s.ClaimsUnproven != 0 {
			t.Fatalf("batch size %d: claims won %d, unproven %d; want %d and 0", batch, s.ClaimsWon, s.ClaimsUnproven, n)
		}
	}
}
