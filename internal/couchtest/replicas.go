package couchtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// ReplicaFront is one logical database of a three-node CouchDB 3 cluster
// (q=1, n=3, w=2, r=2), emulated on the test server: each node owns one
// replica, a real database on the server, and has its own HTTP endpoint.
//
// What it copies from CouchDB 3 (docs.couchdb.org cluster/theory; the
// fabric_doc_open, fabric_doc_open_revs and fabric_doc_update modules of
// apache/couchdb):
//
//   - A write (PUT or DELETE of a document, _local documents included, and
//     _bulk_docs) is sent to every reachable replica at once, each after a
//     small random delay (Jitter), and each replica applies it with its own
//     MVCC: it takes the edit only if the edit's _rev is a leaf it holds.
//     Replicas can therefore diverge: two edits of one revision sent
//     through different nodes are taken by different replicas. The answer
//     is 201 when w=2 replicas took the write, 202 Accepted when one did
//     (for _bulk_docs: when some row was taken by only one; the row is ok),
//     the replicas' own error (409 when they refused it) when none did, 503
//     when none answered. Revision ids are deterministic on the test server
//     (PouchDB 7 hashes the body and its parent), as on CouchDB, so one
//     write taken by several replicas is one revision, not a conflict.
//   - Internal replication: a background loop copies what one replica has
//     and another lacks (its _changes, _revs_diff, _bulk_get with
//     revs=true, _bulk_docs new_edits=false), every Lag, in both
//     directions, resuming from per-pair checkpoints. Writes taken by
//     different replicas thus meet and become a stored conflict, as on a
//     cluster; a replica that was stopped catches up once started.
//   - GET of a document: asked of every reachable replica; the first r=2
//     identical answers are the answer (the later ones may differ, and a
//     repair is started in the background). When no r answers agree, the
//     document is repaired (its missing revisions copied between the
//     replicas) and the answer is the one whose revision wins (not deleted,
//     then highest revision), with that replica's own _conflicts, as
//     fabric_doc_open's choose_reply: a branch that only another replica
//     held is not in it. _local documents are never repaired.
//   - GET with open_revs (a list, or "all"): the union of the replicas'
//     answers (a revision found anywhere is found), leaves that are an
//     ancestor of another replica's leaf dropped, as fabric_doc_open_revs.
//   - _changes from the node's own replica; if that replica is stopped,
//     from another one. Its seqs are opaque ("<seq>-r<replica>") and a seq
//     from another replica means nothing there: the feed starts again from
//     0, the rewind apache/couchdb#3788 describes (CouchDB may rewind less,
//     to an internal checkpoint). _all_docs, _find, _bulk_get, _revs_diff
//     and the database info (with the cluster settings q=1, n=3, w=2,
//     r=2 added) are read from the node's replica alone, as a
//     cluster's views and feeds read one copy of each shard.
//   - StopReplica / StartReplica: a stopped replica takes no writes and
//     answers no reads (requests to it in flight are cut off); KillNode
//     closes a node's endpoint (connections cut, new ones refused) and stops
//     its replica, a machine lost.
//
// What it does not: shards (q=1: one copy range per node), the per-request
// r and w parameters, timeouts of slow replicas (a reachable replica always
// answers), security (the front talks to the server as admin), attachments,
// views, continuous feeds (refused with 400), the _db_updates feed, purge,
// and nodes that keep coordinating while their own replica is stopped are
// treated as any other node (they reach the other two). Internal
// replication here is the front's own loop, not CouchDB's mem3.
type ReplicaFront struct {
	opts   couch.Options
	target *url.URL
	client *http.Client
	proxy  *httputil.ReverseProxy
	name   string   // the logical database
	dbs    []string // the replicas' databases on the server
	jitter time.Duration
	lag    time.Duration

	ctx    context.Context // cancelled at cleanup
	cancel context.CancelFunc
	wg     sync.WaitGroup // the replication loop, repairs, servers, handlers

	mu    sync.Mutex
	up    []context.Context // nil when the replica is stopped
	down  []context.CancelFunc
	nodes []*replicaNode
	cp    [][]string // cp[a][b]: seq of replica a copied to b

	requests, accepted, copied, repairs, rewinds atomic.Int64
}

type replicaNode struct {
	srv  *http.Server
	url  string
	dead atomic.Bool
}

// ReplicaOptions shapes a ReplicaFront.
type ReplicaOptions struct {
	// Jitter is the largest random delay before a write reaches each
	// replica, so that racing writes reach replicas in different orders.
	// Zero means 3ms; negative, none.
	Jitter time.Duration
	// Lag is the pause between rounds of internal replication. Zero means
	// 100ms.
	Lag time.Duration
}

const (
	replicaCount = 3
	quorum       = replicaCount/2 + 1
)

// NewReplicaFront creates a logical database of three replicas on the
// package's test server and starts a node endpoint for each; all is
// stopped and deleted when the test ends.
func NewReplicaFront(tb testing.TB, ro ReplicaOptions) *ReplicaFront {
	tb.Helper()
	opts := Options(tb)
	target, err := url.Parse(opts.URL)
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	name, err := dbName(tb.Name())
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	if ro.Jitter == 0 {
		ro.Jitter = 3 * time.Millisecond
	}
	if ro.Lag <= 0 {
		ro.Lag = 100 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &ReplicaFront{
		opts: opts, target: target, name: name, jitter: max(ro.Jitter, 0), lag: ro.Lag,
		client: &http.Client{Transport: &http.Transport{
			DisableCompression: true, MaxIdleConns: 256, MaxIdleConnsPerHost: 256,
		}},
		ctx: ctx, cancel: cancel,
		up: make([]context.Context, replicaCount), down: make([]context.CancelFunc, replicaCount),
	}
	f.proxy = httputil.NewSingleHostReverseProxy(target)
	f.proxy.ErrorLog = log.New(io.Discard, "", 0)
	admin := Client(tb)
	for i := range replicaCount {
		db := fmt.Sprintf("%s-r%d", name, i)
		cctx, ccancel := context.WithTimeout(ctx, requestTimeout)
		err := admin.CreateDB(cctx, db)
		ccancel()
		if err != nil {
			cancel()
			tb.Fatalf("couchtest: create replica %q: %v", db, err)
		}
		f.dbs = append(f.dbs, db)
		f.up[i], f.down[i] = context.WithCancel(ctx)
		f.cp = append(f.cp, make([]string, replicaCount))
	}
	for i := range replicaCount {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			cancel()
			tb.Fatalf("couchtest: listen: %v", err)
		}
		n := &replicaNode{url: "http://" + ln.Addr().String()}
		n.srv = &http.Server{
			Handler:  http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { f.serve(i, w, r) }),
			ErrorLog: log.New(io.Discard, "", 0),
		}
		f.nodes = append(f.nodes, n)
		f.wg.Go(func() { _ = n.srv.Serve(ln) })
	}
	f.wg.Go(f.replicate)
	tb.Cleanup(func() {
		for _, n := range f.nodes {
			_ = n.srv.Close()
		}
		cancel()
		f.wg.Wait()
		f.client.CloseIdleConnections()
		time.Sleep(150 * time.Millisecond) // see NewDB: a feed query may still run
		for _, db := range f.dbs {
			dctx, dcancel := context.WithTimeout(context.Background(), requestTimeout)
			if err := admin.DestroyDB(dctx, db); err != nil && !couch.IsNotFound(err) {
				tb.Errorf("couchtest: delete replica %q: %v", db, err)
			}
			dcancel()
		}
	})
	return f
}

// Name returns the logical database's name, the same on every node.
func (f *ReplicaFront) Name() string { return f.name }

// Options returns admin options that reach the cluster through node i.
func (f *ReplicaFront) Options(i int) couch.Options {
	o := f.opts
	o.URL = f.nodes[i%len(f.nodes)].url
	return o
}

// DB returns the logical database through node i, with an admin client
// closed with the test.
func (f *ReplicaFront) DB(tb testing.TB, i int) *kivik.DB {
	tb.Helper()
	return newClient(tb, f.Options(i)).DB(f.name)
}

// Replica returns replica i's own database on the server, for a test to
// look at one copy.
func (f *ReplicaFront) Replica(tb testing.TB, i int) *kivik.DB {
	tb.Helper()
	return Client(tb).DB(f.dbs[i])
}

// StopReplica stops replica i: it takes no writes and answers nothing
// until StartReplica; requests to it in flight fail.
func (f *ReplicaFront) StopReplica(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down[i] != nil {
		f.down[i]()
	}
	f.up[i], f.down[i] = nil, nil
}

// StartReplica starts replica i again; internal replication brings it
// what it missed.
func (f *ReplicaFront) StartReplica(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.up[i] == nil {
		f.up[i], f.down[i] = context.WithCancel(f.ctx)
	}
}

// KillNode closes node i's endpoint, cutting its connections, and stops
// its replica: the machine is lost. There is no restart.
func (f *ReplicaFront) KillNode(i int) {
	n := f.nodes[i]
	n.dead.Store(true)
	_ = n.srv.Close()
	f.StopReplica(i)
}

// Requests returns how many requests clients sent to the nodes.
func (f *ReplicaFront) Requests() int64 { return f.requests.Load() }

// Accepted returns how many writes were answered 202.
func (f *ReplicaFront) Accepted() int64 { return f.accepted.Load() }

// Copied returns how many revisions internal replication and read repair
// copied between replicas.
func (f *ReplicaFront) Copied() int64 { return f.copied.Load() }

// Rewinds returns how many feed requests started again from 0 because
// their seq was another replica's.
func (f *ReplicaFront) Rewinds() int64 { return f.rewinds.Load() }

// replicaCtx returns a context for a request to replica i, cancelled with
// parent or when the replica stops; ok is false when it is stopped.
func (f *ReplicaFront) replicaCtx(parent context.Context, i int) (context.Context, context.CancelFunc, bool) {
	f.mu.Lock()
	up := f.up[i]
	f.mu.Unlock()
	if up == nil {
		return nil, nil, false
	}
	ctx, cancel := context.WithCancel(parent)
	stop := context.AfterFunc(up, cancel)
	return ctx, func() { stop(); cancel() }, true
}

// live returns the replicas that are up, node i's own first.
func (f *ReplicaFront) live(i int) []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []int
	for k := range replicaCount {
		if j := (i + k) % replicaCount; f.up[j] != nil {
			out = append(out, j)
		}
	}
	return out
}

// reply is one replica's answer.
type reply struct {
	replica int
	status  int
	header  http.Header
	body    []byte
	err     error
}

// send makes one request to replica i: path is what follows the database
// name ("" for the database itself), escaped.
func (f *ReplicaFront) send(ctx context.Context, i int, method, path, query string, body []byte) reply {
	rctx, done, ok := f.replicaCtx(ctx, i)
	if !ok {
		return reply{replica: i, err: errReplicaDown}
	}
	defer done()
	u := *f.target
	u.RawPath = "/" + url.PathEscape(f.dbs[i])
	if path != "" {
		u.RawPath += "/" + path
	}
	p, err := url.PathUnescape(u.RawPath)
	if err != nil {
		return reply{replica: i, err: err}
	}
	u.Path, u.RawQuery = p, query
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(rctx, method, u.String(), rd)
	if err != nil {
		return reply{replica: i, err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.SetBasicAuth(f.opts.Username, f.opts.Password)
	resp, err := f.client.Do(req)
	if err != nil {
		return reply{replica: i, err: err}
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return reply{replica: i, status: resp.StatusCode, header: resp.Header, body: out, err: err}
}

var errReplicaDown = errors.New("replica stopped")

// fanout sends the request to every live replica at once and hands each
// answer to got as it arrives, until got returns true or all answered.
func (f *ReplicaFront) fanout(ctx context.Context, node int, delay bool, method, path, query string, body []byte, got func(reply) bool) {
	reps := f.live(node)
	ch := make(chan reply, len(reps))
	var wg sync.WaitGroup
	for _, j := range reps {
		wg.Go(func() {
			if delay && f.jitter > 0 {
				t := time.NewTimer(rand.N(f.jitter))
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
				}
			}
			ch <- f.send(ctx, j, method, path, query, body)
		})
	}
	// Writes are waited for in full so that each replica has decided
	// before the answer (a write is never cut off by a fast quorum).
	defer wg.Wait()
	for range reps {
		if got(<-ch) {
			return
		}
	}
}

func (f *ReplicaFront) serve(node int, w http.ResponseWriter, r *http.Request) {
	f.wg.Add(1)
	defer f.wg.Done()
	f.requests.Add(1)
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(f.ctx, cancel)()
	escaped := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	dbSeg, rest, _ := strings.Cut(escaped, "/")
	if db, err := url.PathUnescape(dbSeg); err != nil || db != f.name {
		f.proxy.ServeHTTP(w, r)
		return
	}
	var body []byte
	if r.Body != nil {
		var err error
		if body, err = io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	}
	q := r.URL.RawQuery
	switch {
	case rest == "":
		if r.Method == http.MethodPut {
			writeJSON(w, http.StatusPreconditionFailed, map[string]string{"error": "file_exists", "reason": "The database could not be created, the file already exists."})
			return
		}
		if r.Method == http.MethodGet {
			f.dbInfo(ctx, node, w, q)
			return
		}
		f.local(ctx, node, w, r.Method, rest, q, body)
	case rest == "_changes":
		f.changes(ctx, node, w, r, q, body)
	case rest == "_bulk_docs" && r.Method == http.MethodPost:
		f.bulkDocs(ctx, node, w, q, body)
	case rest == "_index" && r.Method == http.MethodPost:
		f.write(ctx, node, w, r.Method, rest, q, body)
	case strings.HasPrefix(rest, "_") && !strings.HasPrefix(rest, "_local/") && !strings.HasPrefix(rest, "_design/"):
		f.local(ctx, node, w, r.Method, rest, q, body)
	case r.Method == http.MethodPut || r.Method == http.MethodDelete:
		f.write(ctx, node, w, r.Method, rest, q, body)
	case r.Method == http.MethodGet || r.Method == http.MethodHead:
		f.read(ctx, node, w, r.Method, rest, r.URL.Query(), q)
	default:
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request", "reason": "not emulated by ReplicaFront"})
	}
}

// dbInfo answers GET /{db} from the node's replica, named as the logical
// database and with the cluster settings CouchDB 3 reports (q, n, w, r),
// by which a client tells a replicated database from a single copy.
func (f *ReplicaFront) dbInfo(ctx context.Context, node int, w http.ResponseWriter, query string) {
	for _, j := range f.live(node) {
		rp := f.send(ctx, j, http.MethodGet, "", query, nil)
		if rp.err != nil {
			continue
		}
		var info map[string]json.RawMessage
		if rp.status != http.StatusOK || json.Unmarshal(rp.body, &info) != nil {
			relay(w, rp)
			return
		}
		info["db_name"] = mustJSON(f.name)
		info["cluster"] = mustJSON(map[string]int{"q": 1, "n": replicaCount, "w": quorum, "r": quorum})
		writeJSON(w, http.StatusOK, info)
		return
	}
	unavailable(w)
}

// local answers from the node's replica, or another live one.
func (f *ReplicaFront) local(ctx context.Context, node int, w http.ResponseWriter, method, path, query string, body []byte) {
	for _, j := range f.live(node) {
		rp := f.send(ctx, j, method, path, query, body)
		if rp.err == nil {
			relay(w, rp)
			return
		}
	}
	unavailable(w)
}

func relay(w http.ResponseWriter, rp reply) {
	// kivik takes a JSON answer's revision from its ETag.
	if e := rp.header.Get("ETag"); e != "" {
		w.Header().Set("ETag", e)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(rp.status)
	_, _ = w.Write(rp.body)
}

func unavailable(w http.ResponseWriter) {
	writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "unavailable", "reason": "no replica answered"})
}

func okStatus(s int) bool {
	return s == http.StatusOK || s == http.StatusCreated || s == http.StatusAccepted
}

// write sends a single-document write to every live replica and answers
// by quorum.
func (f *ReplicaFront) write(ctx context.Context, node int, w http.ResponseWriter, method, path, query string, body []byte) {
	var oks, fails []reply
	f.fanout(ctx, node, true, method, path, query, body, func(rp reply) bool {
		switch {
		case rp.err != nil:
		case okStatus(rp.status):
			oks = append(oks, rp)
		default:
			fails = append(fails, rp)
		}
		return false
	})
	switch {
	case len(oks) >= quorum:
		relay(w, oks[0])
	case len(oks) > 0:
		f.accepted.Add(1)
		rp := oks[0]
		rp.status = http.StatusAccepted
		relay(w, rp)
	case len(fails) > 0:
		for _, rp := range fails {
			if rp.status == http.StatusConflict {
				relay(w, rp)
				return
			}
		}
		relay(w, fails[0])
	default:
		unavailable(w)
	}
}

// bulkDocs sends _bulk_docs to every live replica; each row is ok when a
// replica took it, and the request is 202 when a row was taken by fewer
// than the quorum.
func (f *ReplicaFront) bulkDocs(ctx context.Context, node int, w http.ResponseWriter, query string, body []byte) {
	var answers [][]map[string]json.RawMessage
	var fails []reply
	f.fanout(ctx, node, true, http.MethodPost, "_bulk_docs", query, body, func(rp reply) bool {
		var rows []map[string]json.RawMessage
		switch {
		case rp.err != nil:
		case okStatus(rp.status) && json.Unmarshal(rp.body, &rows) == nil:
			answers = append(answers, rows)
		default:
			fails = append(fails, rp)
		}
		return false
	})
	if len(answers) == 0 {
		if len(fails) > 0 {
			relay(w, fails[0])
		} else {
			unavailable(w)
		}
		return
	}
	var req struct {
		NewEdits *bool `json:"new_edits"`
	}
	_ = json.Unmarshal(body, &req)
	status := http.StatusCreated
	out := answers[0]
	if req.NewEdits != nil && !*req.NewEdits {
		// Replicated writes: rows carry no revisions to merge.
		if len(answers) < quorum {
			status = http.StatusAccepted
		}
	} else {
		out = make([]map[string]json.RawMessage, len(answers[0]))
		for k := range out {
			oks := 0
			for _, rows := range answers {
				if k >= len(rows) {
					continue
				}
				if rows[k]["error"] == nil {
					if oks == 0 {
						out[k] = rows[k]
					}
					oks++
				} else if out[k] == nil {
					out[k] = rows[k]
				}
			}
			if oks > 0 && oks < quorum {
				status = http.StatusAccepted
			}
		}
	}
	if status == http.StatusAccepted {
		f.accepted.Add(1)
	}
	writeJSON(w, status, out)
}

// read answers a document GET: open_revs from the union of the replicas,
// otherwise from r agreeing replicas, as described on ReplicaFront.
func (f *ReplicaFront) read(ctx context.Context, node int, w http.ResponseWriter, method, path string, params url.Values, query string) {
	if params.Has("open_revs") {
		f.openRevs(ctx, node, w, path, params)
		return
	}
	id, _ := url.PathUnescape(path)
	var replies []reply
	var answer *reply
	agree := map[string]int{}
	f.fanout(ctx, node, false, method, path, query, nil, func(rp reply) bool {
		if rp.err != nil || (rp.status != http.StatusOK && rp.status != http.StatusNotFound) {
			return false
		}
		replies = append(replies, rp)
		if agree[string(rp.body)]++; agree[string(rp.body)] >= quorum {
			answer = &rp
			return true
		}
		return false
	})
	if answer != nil {
		if len(replies) < len(f.live(node)) || len(agree) > 1 {
			// A later replica may differ: repair in the background, as
			// fabric_doc_open does when the others are ancestors.
			f.repairLater(id)
		}
		relay(w, *answer)
		return
	}
	if len(replies) == 0 {
		unavailable(w)
		return
	}
	if !strings.HasPrefix(id, "_local/") && len(agree) > 1 {
		f.repair(ctx, id)
	}
	// choose_reply: not deleted, then the highest revision.
	best := -1
	var bestRev string
	for k, rp := range replies {
		var head struct {
			Rev string `json:"_rev"`
		}
		if rp.status != http.StatusOK || json.Unmarshal(rp.body, &head) != nil {
			continue
		}
		if best < 0 || revLess(bestRev, head.Rev) {
			best, bestRev = k, head.Rev
		}
	}
	if best < 0 {
		best = 0
	}
	relay(w, replies[best])
}

// revLess orders revisions as CouchDB picks a winner: generation, then id.
func revLess(a, b string) bool {
	ga, ha, _ := strings.Cut(a, "-")
	gb, hb, _ := strings.Cut(b, "-")
	na, _ := strconv.Atoi(ga)
	nb, _ := strconv.Atoi(gb)
	if na != nb {
		return na < nb
	}
	return ha < hb
}

// openRevs answers GET ?open_revs= with the union of the live replicas'
// answers.
func (f *ReplicaFront) openRevs(ctx context.Context, node int, w http.ResponseWriter, path string, params url.Values) {
	wantRevs := params.Get("revs") == "true"
	p := url.Values{}
	for k, v := range params {
		p[k] = v
	}
	p.Set("revs", "true") // to drop leaves that are another's ancestors
	found := map[string]json.RawMessage{}
	ancestors := map[string]bool{}
	var order []string
	answered := 0
	etag := ""
	f.fanout(ctx, node, false, http.MethodGet, path, p.Encode(), nil, func(rp reply) bool {
		var rows []map[string]json.RawMessage
		if rp.err != nil || rp.status != http.StatusOK || json.Unmarshal(rp.body, &rows) != nil {
			return false
		}
		if answered++; etag == "" {
			etag = rp.header.Get("ETag")
		}
		for _, row := range rows {
			if row["ok"] != nil {
				var d struct {
					Rev       string `json:"_rev"`
					Revisions struct {
						Start int      `json:"start"`
						IDs   []string `json:"ids"`
					} `json:"_revisions"`
				}
				if json.Unmarshal(row["ok"], &d) != nil {
					continue
				}
				for k, h := range d.Revisions.IDs[min(1, len(d.Revisions.IDs)):] {
					ancestors[fmt.Sprintf("%d-%s", d.Revisions.Start-1-k, h)] = true
				}
				if _, ok := found[d.Rev]; !ok {
					order = append(order, d.Rev)
				}
				found[d.Rev] = row["ok"]
			} else if m := row["missing"]; m != nil {
				var rev string
				if json.Unmarshal(m, &rev) == nil {
					if _, ok := found[rev]; !ok {
						found[rev], order = nil, append(order, rev)
					}
				}
			}
		}
		return false
	})
	if answered == 0 {
		unavailable(w)
		return
	}
	all := params.Get("open_revs") == "all"
	out := []map[string]any{}
	for _, rev := range order {
		doc := found[rev]
		switch {
		case doc == nil:
			out = append(out, map[string]any{"missing": rev})
		case all && ancestors[rev]:
		default:
			if !wantRevs {
				var m map[string]json.RawMessage
				if json.Unmarshal(doc, &m) == nil {
					delete(m, "_revisions")
					doc = mustJSON(m)
				}
			}
			out = append(out, map[string]any{"ok": doc})
		}
	}
	if etag != "" {
		// kivik reads a JSON answer's revision from the ETag, as the
		// test server sends it.
		w.Header().Set("ETag", etag)
	}
	writeJSON(w, http.StatusOK, out)
}

// changes answers a normal or longpoll feed from one replica, with seqs
// that name it.
func (f *ReplicaFront) changes(ctx context.Context, node int, w http.ResponseWriter, r *http.Request, query string, body []byte) {
	params, _ := url.ParseQuery(query)
	if params.Get("feed") == "continuous" || params.Get("feed") == "eventsource" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "bad_request", "reason": "ReplicaFront serves normal and longpoll feeds only"})
		return
	}
	live := f.live(node)
	if len(live) == 0 {
		unavailable(w)
		return
	}
	rep := live[0]
	if since := params.Get("since"); since != "" && since != "0" && since != "now" {
		num, tag, ok := strings.Cut(since, "-r")
		if ok && tag == strconv.Itoa(rep) {
			params.Set("since", num)
		} else {
			f.rewinds.Add(1)
			params.Set("since", "0")
		}
	}
	rctx, done, ok := f.replicaCtx(ctx, rep)
	if !ok {
		unavailable(w)
		return
	}
	defer done()
	u := *f.target
	u.Path, u.RawQuery = "/"+f.dbs[rep]+"/_changes", params.Encode()
	var rd io.Reader
	if len(body) > 0 {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(rctx, r.Method, u.String(), rd)
	if err != nil {
		unavailable(w)
		return
	}
	req.Header.Set("Content-Type", "application/json")
	req.SetBasicAuth(f.opts.Username, f.opts.Password)
	resp, err := f.client.Do(req)
	if err != nil {
		unavailable(w)
		return
	}
	defer resp.Body.Close()
	// Heartbeats (newlines before the answer) pass through as they come.
	br := make([]byte, 1)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(resp.StatusCode)
	fl, _ := w.(http.Flusher)
	var first byte
	for {
		if _, err := io.ReadFull(resp.Body, br); err != nil {
			return
		}
		if br[0] != '\n' && br[0] != ' ' && br[0] != '\r' {
			first = br[0]
			break
		}
		_, _ = w.Write(br)
		if fl != nil {
			fl.Flush()
		}
	}
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		return
	}
	raw := append([]byte{first}, rest...)
	var ans map[string]json.RawMessage
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &ans) != nil {
		_, _ = w.Write(raw)
		return
	}
	tag := func(seq json.RawMessage) json.RawMessage {
		s := strings.Trim(string(seq), `"`)
		return mustJSON(s + "-r" + strconv.Itoa(rep))
	}
	var results []map[string]json.RawMessage
	if json.Unmarshal(ans["results"], &results) == nil {
		for _, row := range results {
			if row["seq"] != nil {
				row["seq"] = tag(row["seq"])
			}
		}
		ans["results"] = mustJSON(results)
	}
	if ans["last_seq"] != nil {
		ans["last_seq"] = tag(ans["last_seq"])
	}
	_ = json.NewEncoder(w).Encode(ans)
}

// replicate is internal replication: every Lag, each live replica's new
// changes are copied to every other live one.
func (f *ReplicaFront) replicate() {
	t := time.NewTicker(f.lag)
	defer t.Stop()
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-t.C:
		}
		for a := range replicaCount {
			f.syncFrom(a)
		}
	}
}

// syncFrom copies to the other live replicas what a's feed since each
// pair's checkpoint shows and they lack, a page at a time, until caught
// up. Targets at the same checkpoint (the usual case) share one feed
// request, which keeps the loop's load on the test server low.
func (f *ReplicaFront) syncFrom(a int) {
	for f.ctx.Err() == nil {
		live := f.live(a)
		if len(live) < 2 || live[0] != a {
			return
		}
		f.mu.Lock()
		groups := map[string][]int{}
		for _, b := range live[1:] {
			groups[f.cp[a][b]] = append(groups[f.cp[a][b]], b)
		}
		f.mu.Unlock()
		more := false
		for since, targets := range groups {
			if f.syncPage(a, since, targets) {
				more = true
			}
		}
		if !more {
			return
		}
	}
}

// syncPage copies one page of a's feed since to targets and moves their
// checkpoints; it reports whether a full page was copied (more may wait).
func (f *ReplicaFront) syncPage(a int, since string, targets []int) bool {
	if since == "" {
		since = "0"
	}
	const page = 500
	q := url.Values{"since": {since}, "style": {"all_docs"}, "limit": {strconv.Itoa(page)}}
	rp := f.send(f.ctx, a, http.MethodGet, "_changes", q.Encode(), nil)
	var feed struct {
		Results []struct {
			ID      string `json:"id"`
			Changes []struct {
				Rev string `json:"rev"`
			} `json:"changes"`
		} `json:"results"`
		LastSeq json.RawMessage `json:"last_seq"`
	}
	if rp.err != nil || rp.status != http.StatusOK || json.Unmarshal(rp.body, &feed) != nil || len(feed.Results) == 0 {
		return false
	}
	revs := map[string][]string{}
	for _, row := range feed.Results {
		for _, c := range row.Changes {
			revs[row.ID] = append(revs[row.ID], c.Rev)
		}
	}
	last := strings.Trim(string(feed.LastSeq), `"`)
	for _, b := range targets {
		if f.copyRevs(f.ctx, a, b, revs) {
			f.mu.Lock()
			f.cp[a][b] = last
			f.mu.Unlock()
		}
	}
	return len(feed.Results) == page
}

// copyRevs copies to b those of revs (id → revisions held by a) that b
// lacks, with their history, as replicated writes.
func (f *ReplicaFront) copyRevs(ctx context.Context, a, b int, revs map[string][]string) bool {
	rp := f.send(ctx, b, http.MethodPost, "_revs_diff", "", mustJSON(revs))
	var diff map[string]struct {
		Missing []string `json:"missing"`
	}
	if rp.err != nil || rp.status != http.StatusOK || json.Unmarshal(rp.body, &diff) != nil {
		return false
	}
	var refs []map[string]string
	for id, d := range diff {
		for _, rev := range d.Missing {
			refs = append(refs, map[string]string{"id": id, "rev": rev})
		}
	}
	if len(refs) == 0 {
		return true
	}
	sort.Slice(refs, func(i, j int) bool { return refs[i]["id"] < refs[j]["id"] })
	rp = f.send(ctx, a, http.MethodPost, "_bulk_get", "revs=true", mustJSON(map[string]any{"docs": refs}))
	var got struct {
		Results []struct {
			Docs []struct {
				OK json.RawMessage `json:"ok"`
			} `json:"docs"`
		} `json:"results"`
	}
	if rp.err != nil || rp.status != http.StatusOK || json.Unmarshal(rp.body, &got) != nil {
		return false
	}
	var docs []json.RawMessage
	for _, r := range got.Results {
		for _, d := range r.Docs {
			if d.OK != nil {
				docs = append(docs, d.OK)
			}
		}
	}
	if len(docs) == 0 {
		return true
	}
	rp = f.send(ctx, b, http.MethodPost, "_bulk_docs", "", mustJSON(map[string]any{"docs": docs, "new_edits": false}))
	if rp.err != nil || rp.status != http.StatusCreated {
		return false
	}
	f.copied.Add(int64(len(docs)))
	return true
}

// repair copies one document's leaves between all live replicas (read
// repair).
func (f *ReplicaFront) repair(ctx context.Context, id string) {
	f.repairs.Add(1)
	live := f.live(0)
	leaves := make([][]string, replicaCount)
	for _, j := range live {
		rp := f.send(ctx, j, http.MethodGet, url.PathEscape(id), "open_revs=all", nil)
		var rows []map[string]json.RawMessage
		if rp.err != nil || rp.status != http.StatusOK || json.Unmarshal(rp.body, &rows) != nil {
			continue
		}
		for _, row := range rows {
			var d struct {
				Rev string `json:"_rev"`
			}
			if row["ok"] != nil && json.Unmarshal(row["ok"], &d) == nil {
				leaves[j] = append(leaves[j], d.Rev)
			}
		}
	}
	for _, a := range live {
		for _, b := range live {
			if a != b && len(leaves[a]) > 0 {
				f.copyRevs(ctx, a, b, map[string][]string{id: leaves[a]})
			}
		}
	}
}

// repairLater repairs a document in the background.
func (f *ReplicaFront) repairLater(id string) {
	if strings.HasPrefix(id, "_local/") {
		return
	}
	f.wg.Go(func() { f.repair(f.ctx, id) })
}

// WaitConverged waits until every live replica holds the same leaves of
// every document, or fails the test after timeout. Documents whose id
// starts with one of ignore are not compared: ones that clients keep
// rewriting (a membership lease renewed every second) may never be equal
// at one instant while replication lags behind them.
func (f *ReplicaFront) WaitConverged(tb testing.TB, timeout time.Duration, ignore ...string) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		diff, example, err := f.divergent(ignore)
		if err == nil && diff == 0 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("couchtest: replicas did not converge in %v: %d documents differ (%v); e.g. %s", timeout, diff, err, example)
		}
		time.Sleep(f.lag)
	}
}

// divergent counts the documents whose leaves differ between live
// replicas, and shows one of them.
func (f *ReplicaFront) divergent(ignore []string) (int, string, error) {
	var maps []map[string]string
	live := f.live(0)
	for _, j := range live {
		rp := f.send(f.ctx, j, http.MethodGet, "_changes", "style=all_docs", nil)
		if rp.err != nil || rp.status != http.StatusOK {
			return 0, "", fmt.Errorf("replica %d feed: %d %w", j, rp.status, rp.err)
		}
		var feed struct {
			Results []struct {
				ID      string `json:"id"`
				Changes []struct {
					Rev string `json:"rev"`
				} `json:"changes"`
			} `json:"results"`
		}
		if err := json.Unmarshal(rp.body, &feed); err != nil {
			return 0, "", fmt.Errorf("replica %d feed: %w", j, err)
		}
		m := map[string]string{}
	rows:
		for _, row := range feed.Results {
			for _, p := range ignore {
				if strings.HasPrefix(row.ID, p) {
					continue rows
				}
			}
			var revs []string
			for _, c := range row.Changes {
				revs = append(revs, c.Rev)
			}
			sort.Strings(revs)
			m[row.ID] = strings.Join(revs, ",")
		}
		maps = append(maps, m)
	}
	diff, example := 0, ""
	show := func(id string) {
		if example == "" {
			example = id + ":"
			for k, m := range maps {
				example += fmt.Sprintf(" replica %d [%s]", live[k], m[id])
			}
		}
	}
	for _, m := range maps[min(1, len(maps)):] {
		for id, revs := range maps[0] {
			if m[id] != revs {
				diff++
				show(id)
			}
		}
		for id := range m {
			if _, ok := maps[0][id]; !ok {
				diff++
				show(id)
			}
		}
	}
	return diff, example, nil
}
