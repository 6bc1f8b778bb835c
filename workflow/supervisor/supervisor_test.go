package supervisor_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// supervisorOptions are short intervals for tests.
func supervisorOptions(t testing.TB, pattern string) supervisor.Options {
	return supervisor.Options{
		Patterns:          []string{pattern},
		MaxOpen:           8,
		DiscoveryInterval: 200 * time.Millisecond,
		IdleStop:          300 * time.Millisecond,
		Turn:              2 * time.Second,
		Engine:            workflowtest.Options(t),
	}
}

// makeDBs creates n databases named prefix-NNNN, each with the docs of
// seed(i). They are not deleted afterwards: PouchDB Server crashes when a
// database is deleted while it still answers a longpoll on it, and the
// package's server goes away with the test binary.
func makeDBs(t testing.TB, client *kivik.Client, prefix string, n int, seed func(i int) []any) []*kivik.DB {
	t.Helper()
	var dbs []*kivik.DB
	for i := range n {
		name := fmt.Sprintf("%s-%04d", prefix, i)
		if err := client.CreateDB(context.Background(), name); err != nil {
			t.Fatal(err)
		}
		db := client.DB(name)
		if docs := seed(i); len(docs) > 0 {
			if _, err := db.BulkDocs(context.Background(), docs); err != nil {
				t.Fatal(err)
			}
		}
		dbs = append(dbs, db)
	}
	return dbs
}

func uniquePrefix(t testing.TB, base string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return base + hex.EncodeToString(b[:])
}

func runSupervisor(t testing.TB, client *kivik.Client, reg *workflow.Registry, opts supervisor.Options) *supervisor.Supervisor {
	t.Helper()
	sup, err := supervisor.New(client, reg, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sup.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("supervisor: %v", err)
		}
	})
	return sup
}

func countDone(t testing.TB, dbs []*kivik.DB) int {
	n := 0
	for _, db := range dbs {
		n += states(t, db)["done"]
	}
	return n
}

// 200 databases with a trickle of work: every one is handled, later
// changes are noticed within a few discovery intervals, and never more
// engines (feeds) run at once than the cap.
func TestSupervisorHandlesManyDatabasesWithinTheCap(t *testing.T) {
	client := couchtest.Client(t)
	prefix := uniquePrefix(t, "sup-many-")
	const n = 200
	dbs := makeDBs(t, client, prefix, n, func(i int) []any {
		return []any{map[string]any{"_id": "a", "type": "job", "state": "new"}}
	})
	// A database that does not match is left alone.
	other := makeDBs(t, client, uniquePrefix(t, "sup-other-"), 1, func(int) []any {
		return []any{map[string]any{"_id": "a", "type": "job", "state": "new"}}
	})
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	opts := supervisorOptions(t, prefix+"-*")
	sup := runSupervisor(t, client, reg, opts)
	began := time.Now()
	workflowtest.Eventually(t, 120*time.Second, "every database handled", func() (bool, string) {
		d := countDone(t, dbs)
		return d == n, fmt.Sprintf("%d of %d; %+v", d, n, sup.SupervisorStats())
	})
	t.Logf("%d databases handled in %v", n, time.Since(began).Round(time.Millisecond))

	// A trickle: one new document in 20 databases, after the engines went idle.
	workflowtest.Eventually(t, 30*time.Second, "engines idle and stopped", func() (bool, string) {
		st := sup.SupervisorStats()
		return st.Open == 0, fmt.Sprint(st)
	})
	written := time.Now()
	for i := 0; i < n; i += 10 {
		if _, err := dbs[i].Put(context.Background(), "b", map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	workflowtest.Eventually(t, 60*time.Second, "trickle handled", func() (bool, string) {
		d := countDone(t, dbs)
		return d == n+n/10, fmt.Sprint(d)
	})
	st := sup.SupervisorStats()
	t.Logf("trickle of %d docs in %d databases handled %v after writing; %d engines started, at most %d at once (cap %d), %d discoveries",
		n/10, n/10, time.Since(written).Round(time.Millisecond), st.Started, st.MaxOpen, opts.MaxOpen, st.Scans)
	if st.MaxOpen > int64(opts.MaxOpen) || st.MaxOpen == 0 {
		t.Fatalf("%d engines ran at once, cap %d", st.MaxOpen, opts.MaxOpen)
	}
	if st.Watched != n {
		t.Fatalf("watching %d databases, want %d", st.Watched, n)
	}
	if st.Discovery != supervisor.DiscoveryAllDBs {
		t.Fatalf("discovery %q on PouchDB Server, which has no /_db_updates; want %q", st.Discovery, supervisor.DiscoveryAllDBs)
	}
	if got := states(t, other[0])["new"]; got != 1 {
		t.Fatalf("a database outside the pattern was handled")
	}
	if err := sup.Ready(); err != nil {
		t.Fatal(err)
	}
}

// Three daemons (supervisors with their own owners) over the same 40
// databases: every unsafe document runs exactly once.
func TestSupervisorsShareDatabasesUnsafeOnce(t *testing.T) {
	client := couchtest.Client(t)
	prefix := uniquePrefix(t, "sup-share-")
	const n, per = 40, 5
	dbs := makeDBs(t, client, prefix, n, func(i int) []any {
		var docs []any
		for j := range per {
			docs = append(docs, map[string]any{"_id": fmt.Sprintf("m%d", j), "type": "mail", "state": "new"})
		}
		return docs
	})
	execs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			execs.inc(doc.DB().Name() + "/" + doc.ID)
			return workflow.Transition("done"), nil
		})})
	for i := range 3 {
		opts := supervisorOptions(t, prefix+"-*")
		opts.Engine.Owner = fmt.Sprintf("daemon-%d", i)
		runSupervisor(t, client, reg, opts)
	}
	workflowtest.Eventually(t, 120*time.Second, "all done", func() (bool, string) {
		d := countDone(t, dbs)
		return d == n*per, fmt.Sprint(d)
	})
	for _, db := range dbs {
		for j := range per {
			if c := execs.get(fmt.Sprintf("%s/m%d", db.Name(), j)); c != 1 {
				t.Errorf("%s/m%d ran %d times", db.Name(), j, c)
			}
		}
	}
}

// A document waiting for a wake-up in a database whose engine went idle and
// stopped is handled when the wake-up is due, though nothing changed.
func TestSupervisorRestartsAnEngineWhenAWakeUpIsDue(t *testing.T) {
	client := couchtest.Client(t)
	prefix := uniquePrefix(t, "sup-due-")
	dbs := makeDBs(t, client, prefix, 1, func(int) []any {
		return []any{map[string]any{"_id": "w", "type": "timer", "state": "new"}}
	})
	var runs atomic.Int64
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "timer", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			if runs.Add(1) == 1 {
				return workflow.Stay().Set("waiting", true).WakeAt(time.Now().Add(3 * time.Second)), nil
			}
			return workflow.Transition("done"), nil
		})})
	sup := runSupervisor(t, client, reg, supervisorOptions(t, prefix+"-*"))
	workflowtest.Eventually(t, 30*time.Second, "engine stopped while waiting", func() (bool, string) {
		st := sup.SupervisorStats()
		return runs.Load() == 1 && st.Stopped >= 1 && st.Open == 0, fmt.Sprint(st)
	})
	workflowtest.Eventually(t, 30*time.Second, "woken and done", func() (bool, string) {
		return states(t, dbs[0])["done"] == 1, fmt.Sprint(runs.Load())
	})
}

// A watched database deleted and created again under the same name: no
// crash, and the new database's documents are all handled: the old
// checkpoint is not applied to it.
func TestSupervisorRecreatedDatabaseStartsOver(t *testing.T) {
	client := couchtest.Client(t)
	prefix := uniquePrefix(t, "sup-recreate-")
	seed := func(n int) []any {
		var docs []any
		for j := range n {
			docs = append(docs, map[string]any{"_id": fmt.Sprintf("j%02d", j), "type": "job", "state": "new"})
		}
		return docs
	}
	dbs := makeDBs(t, client, prefix, 1, func(int) []any { return seed(20) })
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	sup := runSupervisor(t, client, reg, supervisorOptions(t, prefix+"-*"))
	workflowtest.Eventually(t, 30*time.Second, "first database done and idle", func() (bool, string) {
		st := sup.SupervisorStats()
		return states(t, dbs[0])["done"] == 20 && st.Open == 0, fmt.Sprint(st)
	})
	ctx := context.Background()
	if err := client.DestroyDB(ctx, dbs[0].Name()); err != nil {
		t.Fatal(err)
	}
	// PouchDB Server can answer 412 (exists) after a delete: it keeps the
	// name in its list of databases while it closes the old one, and a
	// request that reached the database during the delete (the
	// supervisor's discovery reads every database's info) can put the
	// name back for good. CouchDB does neither. Retry, deleting again.
	workflowtest.Eventually(t, 30*time.Second, "database created again", func() (bool, string) {
		err := client.CreateDB(ctx, dbs[0].Name())
		if err != nil && kivik.HTTPStatus(err) == http.StatusPreconditionFailed {
			if derr := client.DestroyDB(ctx, dbs[0].Name()); derr != nil && kivik.HTTPStatus(derr) != http.StatusNotFound {
				return false, fmt.Sprintf("%v; deleting again: %v", err, derr)
			}
			return false, err.Error()
		}
		if err != nil {
			t.Fatal(err)
		}
		return true, ""
	})
	if _, err := dbs[0].BulkDocs(ctx, seed(3)); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 30*time.Second, "new database's documents done", func() (bool, string) {
		st := states(t, dbs[0])
		return st["done"] == 3, fmt.Sprint(st)
	})
}

// Sharded daemons split the databases: each watches only its shard, the
// shards cover every database once, and all the work is done.
func TestShardedSupervisorsSplitTheDatabases(t *testing.T) {
	client := couchtest.Client(t)
	prefix := uniquePrefix(t, "sup-shard-")
	const n = 30
	dbs := makeDBs(t, client, prefix, n, func(int) []any {
		return []any{map[string]any{"_id": "a", "type": "job", "state": "new"}}
	})
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	var sups []*supervisor.Supervisor
	for i := range 3 {
		opts := supervisorOptions(t, prefix+"-*")
		opts.Shard, opts.Shards = i, 3
		sups = append(sups, runSupervisor(t, client, reg, opts))
	}
	workflowtest.Eventually(t, 60*time.Second, "all done", func() (bool, string) {
		d := countDone(t, dbs)
		return d == n, fmt.Sprint(d)
	})
	total := 0
	for i, s := range sups {
		w := s.SupervisorStats().Watched
		total += w
		if w == 0 || w == n {
			t.Errorf("shard %d watches %d of %d databases", i, w, n)
		}
	}
	if total != n {
		t.Fatalf("shards watch %d databases in all, want %d", total, n)
	}
	if _, err := supervisor.New(client, reg, supervisor.Options{Patterns: []string{"x-*"}, Shard: 3, Shards: 3}); err == nil {
		t.Fatal("shard 3 of 3 accepted")
	}
}

// Where the server has /_db_updates, the supervisor follows it: changed
// and new databases are handled without another listing of _all_dbs. The
// feed comes from couchtest's front for PouchDB Server, which lacks it.
func TestSupervisorFollowsDBUpdates(t *testing.T) {
	front := couchtest.NewDBUpdatesServer(t)
	client := front.Client(t)
	prefix := uniquePrefix(t, "sup-updates-")
	seed := func(int) []any { return []any{map[string]any{"_id": "a", "type": "job", "state": "new"}} }
	dbs := makeDBs(t, client, prefix, 20, seed)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	opts := supervisorOptions(t, prefix+"-*")
	opts.DiscoveryInterval = time.Minute // the catch-up listing runs at start only
	sup := runSupervisor(t, client, reg, opts)
	workflowtest.Eventually(t, 60*time.Second, "every database handled", func() (bool, string) {
		d := countDone(t, dbs)
		return d == len(dbs), fmt.Sprintf("%d of %d; %+v", d, len(dbs), sup.SupervisorStats())
	})
	if m := sup.Mode(); m != supervisor.DiscoveryDBUpdates {
		t.Fatalf("discovery mode %q, want %q", m, supervisor.DiscoveryDBUpdates)
	}
	workflowtest.Eventually(t, 30*time.Second, "engines idle and stopped", func() (bool, string) {
		st := sup.SupervisorStats()
		return st.Open == 0, fmt.Sprint(st)
	})

	written := time.Now()
	for _, db := range dbs[:5] {
		if _, err := db.Put(context.Background(), "b", map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	dbs = append(dbs, makeDBs(t, client, prefix+"-new", 2, seed)...)
	workflowtest.Eventually(t, 30*time.Second, "changed and new databases handled", func() (bool, string) {
		d := countDone(t, dbs)
		return d == 27, fmt.Sprintf("%d of 27", d)
	})
	st := sup.SupervisorStats()
	t.Logf("5 changed and 2 new databases handled %v after writing; %d listings of _all_dbs, %d engines started, %d feed events",
		time.Since(written).Round(time.Millisecond), st.Scans, st.Started, front.Events())
	if st.Scans != 1 {
		t.Fatalf("%d listings of _all_dbs; want only the one at start", st.Scans)
	}
	if st.Watched != 22 {
		t.Fatalf("watching %d databases, want 22", st.Watched)
	}
}
