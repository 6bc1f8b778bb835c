package workflow_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// readLog is a proxy in front of the test server that notes which document
// bodies one client asked for: by id through a bulk fetch (POST _all_docs
// with keys, _bulk_get) or a single GET, and how many feed requests asked
// for bodies (include_docs).
type readLog struct {
	mu        sync.Mutex
	fetched   map[string]int
	got       map[string]int
	bodyFeeds int
	feeds     int
}

func (l *readLog) counts() (fetched, got map[string]int, bodyFeeds, feeds int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fetched, got = map[string]int{}, map[string]int{}
	for k, v := range l.fetched {
		fetched[k] = v
	}
	for k, v := range l.got {
		got[k] = v
	}
	return fetched, got, l.bodyFeeds, l.feeds
}

// recordedDB returns db reached through a new client whose requests l
// records.
func recordedDB(t *testing.T, db *kivik.DB) (*kivik.DB, *readLog) {
	t.Helper()
	opts := couchtest.Options(t)
	target, err := url.Parse(opts.URL)
	if err != nil {
		t.Fatal(err)
	}
	l := &readLog{fetched: map[string]int{}, got: map[string]int{}}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1 // feeds stream, heartbeats included
	proxy.ErrorLog = log.New(io.Discard, "", 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path := strings.TrimPrefix(r.URL.EscapedPath(), "/"+url.PathEscape(db.Name())+"/")
		var body []byte
		if r.Body != nil {
			body, _ = io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		l.mu.Lock()
		switch {
		case path == "_all_docs" && r.Method == http.MethodPost:
			var req struct {
				Keys []string `json:"keys"`
			}
			_ = json.Unmarshal(body, &req)
			for _, k := range req.Keys {
				l.fetched[k]++
			}
		case path == "_bulk_get":
			var req struct {
				Docs []struct {
					ID string `json:"id"`
				} `json:"docs"`
			}
			_ = json.Unmarshal(body, &req)
			for _, d := range req.Docs {
				l.fetched[d.ID]++
			}
		case path == "_changes":
			l.feeds++
			if r.URL.Query().Get("include_docs") == "true" {
				l.bodyFeeds++
			}
		case r.Method == http.MethodGet && !strings.HasPrefix(path, "_") && !strings.Contains(path, "/"):
			if id, err := url.PathUnescape(path); err == nil {
				l.got[id]++
			}
		}
		l.mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	opts.URL = srv.URL
	client, err := couch.NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client.DB(db.Name()), l
}

// readBack waits until each engine's feed has read past every write made
// so far: documents of a type none handles are written after them, and
// each engine must have passed over one (a member only its own share's,
// so there are enough that each gets some; 20 ids between two members
// miss one with odds of 2e-6). Then it stops the engines, as stop does.
func readBack(t *testing.T, db *kivik.DB, engines ...*workflowtest.Running) {
	t.Helper()
	before := make([]int64, len(engines))
	for i, e := range engines {
		before[i] = e.Stats().Skipped
	}
	putDocs(t, db, "zz-sentinel", 20, "sentinel", "x", nil)
	workflowtest.Eventually(t, 30*time.Second, "feeds read past the writes", func() (bool, string) {
		for i, e := range engines {
			if s := e.Stats(); s.Skipped == before[i] || s.Pending != 0 || s.Queued != 0 || s.Inflight != 0 {
				return false, fmt.Sprintf("engine %d: %+v", i, s)
			}
		}
		return true, ""
	})
}

// stopQuietly stops eng and gives the server a moment before the test
// deletes the database (see stop).
func stopQuietly(t *testing.T, eng *workflowtest.Running) {
	t.Helper()
	eng.Stop(t)
	time.Sleep(300 * time.Millisecond)
}

// Two members on one database read the feed without bodies and fetch only
// the bodies of their own share: neither ever asks for a document the other
// runs, and neither reads back the documents it moved to done.
func TestMembersFetchOnlyTheirShareAndNotTheirOwnWrites(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ran := &ownerLog{}
	start := func(owner string) (*workflowtest.Running, *readLog) {
		rdb, l := recordedDB(t, db)
		reg := workflow.NewRegistry()
		reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
			Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
				ran.add(doc.ID, owner)
				return workflow.Transition("done"), nil
			})})
		opts := workflowtest.Options(t)
		opts.Members = true
		// Long enough that no renewal runs late under -race: the split
		// must not change during the test.
		opts.MemberLease = 20 * time.Second
		opts.Owner = owner
		opts.NoStartScan = true
		return workflowtest.Start(t, rdb, reg, opts), l
	}
	a, logA := start("member-a")
	b, logB := start("member-b")
	workflowtest.Eventually(t, 20*time.Second, "both see two members", func() (bool, string) {
		return a.Stats().Members == 2 && b.Stats().Members == 2, fmt.Sprintf("a=%d b=%d", a.Stats().Members, b.Stats().Members)
	})
	const n = 300
	putDocs(t, db, "j", n, "job", "new", nil)
	workflowtest.Eventually(t, time.Minute, "all done", func() (bool, string) {
		st := states(t, db)
		return st["done"] == n, fmt.Sprint(st)
	})
	readBack(t, db, a, b)
	if d := ran.doubles(); len(d) > 0 {
		t.Fatalf("run by both members: %v", d)
	}
	for _, m := range []struct {
		owner string
		eng   *workflowtest.Running
		log   *readLog
	}{{"member-a", a, logA}, {"member-b", b, logB}} {
		fetched, got, bodyFeeds, feeds := m.log.counts()
		if feeds == 0 || bodyFeeds == feeds {
			t.Errorf("%s: %d of %d feed requests asked for bodies", m.owner, bodyFeeds, feeds)
		}
		runs, refetched := 0, 0
		ran.mu.Lock()
		by := ran.by
		ran.mu.Unlock()
		for id, owners := range by {
			if owners[m.owner] > 0 {
				runs++
				// Fetches only: the rescan that follows the members
				// seeing each other may still run as the documents are
				// written, and queue some ids for a run that reads them.
				if fetched[id] > 1 {
					refetched++
				}
			} else if fetched[id]+got[id] > 0 {
				t.Errorf("%s read %s (fetched %d, got %d), run by %v", m.owner, id, fetched[id], got[id], owners)
			}
		}
		// Each of its documents is read once, in state new; the feed row
		// of its own write (done) is finished unread. A row may come
		// before the write's answer and be fetched: rarely.
		if runs == 0 || refetched > runs/10 {
			t.Errorf("%s: %d of its %d documents read more than once", m.owner, refetched, runs)
		}
		if s := m.eng.Stats(); s.OwnRows < int64(runs-runs/10) || s.SkippedOther == 0 {
			t.Errorf("%s: %d own rows finished unread of %d runs, %d skipped as the other's", m.owner, s.OwnRows, runs, s.SkippedOther)
		}
	}
	stopQuietly(t, a)
	stopQuietly(t, b)
}

// A single engine with FeedWithoutBodies fetches each document once, in
// the state it runs, and never reads back what it wrote: neither the final
// state nor, for unsafe work, its own claim.
func TestOwnWritesAreNotReadBack(t *testing.T) {
	for _, c := range []struct {
		name string
		mode workflow.Mode
		n    int
		// hold keeps each handler running long enough for the feed to
		// bring the row of its claim while the run still holds it.
		hold time.Duration
	}{{"safe", workflow.Safe, 200, 0}, {"unsafe", workflow.Unsafe, 200, 0}, {"unsafe-claim-rows", workflow.Unsafe, 40, 300 * time.Millisecond}} {
		t.Run(c.name, func(t *testing.T) {
			db := couchtest.NewDB(t, couchtest.Client(t))
			rdb, l := recordedDB(t, db)
			runs := newCounter()
			reg := workflow.NewRegistry()
			reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: c.mode,
				Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
					if !sleepCtx(ctx, c.hold) {
						return workflow.Result{}, ctx.Err()
					}
					runs.inc(doc.ID)
					return workflow.Transition("done"), nil
				})})
			opts := workflowtest.Options(t)
			opts.Workers = c.n
			opts.NoStartScan = true
			opts.ResyncInterval = time.Minute // no scan reads a document
			opts.FeedWithoutBodies = true
			eng := workflowtest.Start(t, rdb, reg, opts)
			n := c.n
			putDocs(t, db, "j", n, "job", "new", nil)
			workflowtest.Eventually(t, time.Minute, "all done", func() (bool, string) {
				s := eng.Stats()
				return s.Transitions == int64(n), fmt.Sprintf("%+v", s)
			})
			readBack(t, db, eng)
			fetched, got, bodyFeeds, _ := l.counts()
			reads := 0
			for _, m := range []map[string]int{fetched, got} {
				for id, c := range m {
					if strings.HasPrefix(id, "j-") {
						reads += c
					}
				}
			}
			// One read per document; a row that comes before its write's
			// answer is fetched again, rarely.
			if reads < n || reads > n+n/10 || bodyFeeds != 0 {
				t.Errorf("%d document reads for %d documents (%d fetched, %d single), %d feed requests with bodies",
					reads, n, len(fetched), len(got), bodyFeeds)
			}
			if s := eng.Stats(); s.OwnRows < int64(n-n/10) || s.BodiesFetched < int64(n-n/10) {
				t.Errorf("own rows finished unread %d, bodies fetched %d, want about %d each", s.OwnRows, s.BodiesFetched, n)
			}
			if runs.total() != n {
				t.Errorf("%d runs for %d documents", runs.total(), n)
			}
			stopQuietly(t, eng)
		})
	}
}

// A stored conflict stays visible to a feed without bodies: its row lists
// two leaves, so the engine reads the document with its conflicts (a
// _bulk_get body would not show them) and resolves them before it acts.
func TestFeedWithoutBodiesSeesStoredConflicts(t *testing.T) {
	ctx := context.Background()
	db := couchtest.NewDB(t, couchtest.Client(t))
	rev1, err := db.Put(ctx, "x", map[string]any{"type": "mail", "state": "new"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Put(ctx, "x", map[string]any{"_rev": rev1, "type": "mail", "state": "new", "side": "a"}); err != nil {
		t.Fatal(err)
	}
	branch := map[string]any{"_id": "x", "_rev": "2-00000000000000000000000000000000", "type": "mail", "state": "new", "side": "b",
		"_revisions": map[string]any{"start": 2, "ids": []string{"00000000000000000000000000000000", rev1[2:]}}}
	if _, err := db.BulkDocs(ctx, []any{branch}, kivik.Param("new_edits", false)); err != nil {
		t.Fatal(err)
	}
	if conflicted(t, db) != 1 {
		t.Fatal("the test server did not store the conflict")
	}
	runs := newCounter()
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Safe, Handler: oneStep(runs, "sent")})
	opts := workflowtest.Options(t)
	opts.NoStartScan = true // the feed, not the start scan, must bring it
	opts.ResyncInterval = time.Minute
	opts.FeedWithoutBodies = true
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 30*time.Second, "sent", func() (bool, string) {
		d := get(t, db, "x")
		return d.State == "sent", fmt.Sprint(d.State)
	})
	if c := conflicted(t, db); c != 0 {
		t.Fatalf("%d documents still conflicted", c)
	}
	if s := eng.Stats(); s.BranchesRemoved != 1 {
		t.Errorf("branches removed %d, want 1", s.BranchesRemoved)
	}
	readBack(t, db, eng)
	stopQuietly(t, eng)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
