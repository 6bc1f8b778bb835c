package couchtest_test

import (
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
)

// put writes doc through db and returns the revision and whether the
// answer was 201 (quorum) rather than 202.
func put(t *testing.T, db *kivik.DB, id string, doc map[string]any) (string, bool) {
	t.Helper()
	c, st := couch.RecordStatus(ctx(t))
	rev, err := db.Put(c, id, doc)
	if err != nil {
		t.Fatalf("put %s: %v", id, err)
	}
	return rev, st.Certain()
}

func leafRev(t *testing.T, db *kivik.DB, id string) (string, []string) {
	t.Helper()
	var d struct {
		Rev       string   `json:"_rev"`
		Conflicts []string `json:"_conflicts"`
	}
	if err := db.Get(ctx(t), id, kivik.Param("conflicts", true)).ScanDoc(&d); err != nil {
		return "", nil
	}
	return d.Rev, d.Conflicts
}

func TestReplicaFrontQuorumAndReplication(t *testing.T) {
	f := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{})
	n0, n2 := f.DB(t, 0), f.DB(t, 2)

	rev1, certain := put(t, n0, "a", map[string]any{"v": 1})
	if !certain {
		t.Fatal("a write all three replicas took was not answered 201")
	}
	for i := range 3 {
		if got, _ := leafRev(t, f.Replica(t, i), "a"); got != rev1 {
			t.Fatalf("replica %d holds %q, want %q (revisions must be the same on every replica)", i, got, rev1)
		}
	}

	// One replica down: still a quorum; it catches up once started.
	f.StopReplica(2)
	rev2, certain := put(t, n0, "a", map[string]any{"_rev": rev1, "v": 2})
	if !certain {
		t.Fatal("a write two replicas took was not answered 201")
	}
	if got, _ := leafRev(t, f.Replica(t, 2), "a"); got != rev1 {
		t.Fatalf("stopped replica holds %q, want %q", got, rev1)
	}
	// Two down: one replica takes it, 202.
	f.StopReplica(1)
	rev3, certain := put(t, n0, "a", map[string]any{"_rev": rev2, "v": 3})
	if certain {
		t.Fatal("a write one replica took was answered 201")
	}
	// Now a rival edit of rev2 taken by replicas 1 and 2 alone: replica 2
	// gets rev2 first by replication.
	f.StopReplica(0)
	f.StartReplica(1)
	f.StartReplica(2)
	f.WaitConverged(t, 10*time.Second)
	rival, certain := put(t, n2, "a", map[string]any{"_rev": rev2, "v": 30})
	if !certain {
		t.Fatal("the rival edit on two replicas was not answered 201")
	}
	f.StartReplica(0)
	f.WaitConverged(t, 10*time.Second)
	for i := range 3 {
		win, conflicts := leafRev(t, f.Replica(t, i), "a")
		all := append([]string{win}, conflicts...)
		if len(all) != 2 || !(strings.Contains(strings.Join(all, " "), rev3) && strings.Contains(strings.Join(all, " "), rival)) {
			t.Fatalf("replica %d leaves %v, want the conflict %s / %s", i, all, rev3, rival)
		}
	}
	if win, conflicts := leafRev(t, n0, "a"); len(conflicts) != 1 || win == "" {
		t.Fatalf("through the front: %s %v, want one conflict", win, conflicts)
	}
	if f.Copied() == 0 || f.Accepted() != 1 {
		t.Fatalf("copied %d, accepted %d; want some and 1", f.Copied(), f.Accepted())
	}
}

func TestReplicaFrontFeedAndKill(t *testing.T) {
	f := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{})
	n1 := f.DB(t, 1)
	put(t, n1, "x", map[string]any{"v": 1})
	rows := n1.Changes(ctx(t))
	var seq string
	for rows.Next() {
		seq = rows.Seq()
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	_ = rows.Close()
	if !strings.HasSuffix(seq, "-r1") {
		t.Fatalf("seq %q is not node 1's replica's", seq)
	}
	// Node 1 lost: node 0 still answers, from its replica, and a seq of
	// replica 1 starts its feed again.
	f.KillNode(1)
	if _, err := n1.Put(ctx(t), "y", map[string]any{"v": 1}); err == nil {
		t.Fatal("a killed node answered")
	}
	n0 := f.DB(t, 0)
	put(t, n0, "y", map[string]any{"v": 1})
	rows = n0.Changes(ctx(t), kivik.Param("since", seq))
	n := 0
	for rows.Next() {
		n++
	}
	_ = rows.Close()
	if n != 2 || f.Rewinds() != 1 {
		t.Fatalf("%d rows, %d rewinds; want both documents again and 1 rewind", n, f.Rewinds())
	}
}

// TestReplicaFrontOpenAllRevsSeesEveryBranch shows why the engine proves
// claims with open_revs=all (couch.OpenAllRevs): a branch that one replica
// took (a 202 write) is missing from a GET that two other replicas answer
// alike, as on CouchDB, while open_revs=all merges what the replicas hold.
func TestReplicaFrontOpenAllRevsSeesEveryBranch(t *testing.T) {
	f := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{Lag: time.Hour})
	n0, n1, n2 := f.DB(t, 0), f.DB(t, 1), f.DB(t, 2)
	rev1, _ := put(t, n0, "a", map[string]any{"v": 1})

	f.StopReplica(1)
	f.StopReplica(2)
	lone, certain := put(t, n0, "a", map[string]any{"_rev": rev1, "v": "only on replica 0"})
	if certain {
		t.Fatal("a write one replica took was answered 201")
	}
	f.StartReplica(1)
	f.StartReplica(2)
	f.StopReplica(0)
	quorum, certain := put(t, n1, "a", map[string]any{"_rev": rev1, "v": "on replicas 1 and 2"})
	if !certain {
		t.Fatal("a write two replicas took was not answered 201")
	}
	f.StartReplica(0)

	if got, conflicts := leafRev(t, n2, "a"); got != quorum || len(conflicts) != 0 {
		t.Fatalf("GET conflicts=true: %s %v; want %s alone, as replicas 1 and 2 answer alike (the front no longer shows what CouchDB does)", got, conflicts, quorum)
	}
	rs := couch.OpenAllRevs(ctx(t), n2, "a")
	defer rs.Close()
	seen := map[string]bool{}
	for rs.Next() {
		var rows []struct {
			OK struct {
				Rev string `json:"_rev"`
			} `json:"ok"`
		}
		if err := rs.ScanDoc(&rows); err != nil {
			t.Fatal(err)
		}
		for _, r := range rows {
			seen[r.OK.Rev] = true
		}
	}
	if err := rs.Err(); err != nil {
		t.Fatal(err)
	}
	if !seen[lone] || !seen[quorum] || len(seen) != 2 {
		t.Fatalf("open_revs=all saw %v; want %s and %s", seen, lone, quorum)
	}
}

// TestReplicaFrontReportsItsCopies checks that a client can tell the front
// from a single server by the database's cluster settings.
func TestReplicaFrontReportsItsCopies(t *testing.T) {
	f := couchtest.NewReplicaFront(t, couchtest.ReplicaOptions{})
	n, err := couch.Replicas(ctx(t), f.DB(t, 1))
	if err != nil || n != 3 {
		t.Fatalf("front: %d copies (%v), want 3", n, err)
	}
	single := couchtest.NewDB(t, couchtest.Client(t))
	if n, err := couch.Replicas(ctx(t), single); err != nil || n != 1 {
		t.Fatalf("test server: %d copies (%v), want 1", n, err)
	}
}
