package couchtest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// ClusterFront fronts the test server with the two answers a CouchDB 3
// cluster (n=3 replicas, write quorum 2) gives and a single node never does:
//
//   - 202 Accepted for a write that fewer replicas than the quorum took.
//     The write is made; only its answer changes. For _bulk_docs the 202 is
//     the request's, as on CouchDB: rows carry no status of their own.
//   - A stored conflict from two writers who edited the same revision at
//     once through different coordinators, each reaching some replica
//     first. The single node refuses the second writer with 409; the front
//     (when Split chooses the write) stores that write as a conflicting
//     branch instead, with _bulk_docs new_edits=false, which the server
//     keeps as a real conflict (_conflicts), and answers it 202 with the
//     new revision, as the cluster answers a write some replica took.
//
// Only a 409 against the revision the current winner was just written on
// is split: that is the race a cluster turns into a conflict. A writer
// whose _rev is older still gets 409, as every replica would refuse it.
//
// It is an emulation of what a cluster's clients see, not a cluster: there
// is one copy of each document, reads are always up to date (a quorum
// read), and which writes race is decided by the test through Split and
// Accept rather than by timing across replicas. Every endpoint reaches the
// same database, as every node of a cluster coordinates for every shard.
type ClusterFront struct {
	target *url.URL
	proxy  *httputil.ReverseProxy
	srvs   []*httptest.Server
	opts   couch.Options
	client *http.Client

	mu     sync.Mutex
	split  func(id string, body map[string]json.RawMessage) bool
	accept func(id string, body map[string]json.RawMessage) bool

	splits, accepted atomic.Int64
}

// NewClusterFront starts endpoints fronts (at least one) for the package's
// test server; they are closed when the test ends. Until Split or Accept is
// set it passes everything through unchanged.
func NewClusterFront(tb testing.TB, endpoints int) *ClusterFront {
	tb.Helper()
	opts := Options(tb)
	target, err := url.Parse(opts.URL)
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	f := &ClusterFront{target: target, opts: opts, client: &http.Client{}}
	f.proxy = httputil.NewSingleHostReverseProxy(target)
	f.proxy.ErrorLog = log.New(io.Discard, "", 0) // cancelled feeds are routine
	for range max(endpoints, 1) {
		srv := httptest.NewServer(http.HandlerFunc(f.serve))
		tb.Cleanup(srv.Close)
		f.srvs = append(f.srvs, srv)
	}
	tb.Cleanup(f.client.CloseIdleConnections)
	return f
}

// Options returns admin options that reach the server through endpoint i.
func (f *ClusterFront) Options(i int) couch.Options {
	o := f.opts
	o.URL = f.srvs[i%len(f.srvs)].URL
	return o
}

// Client returns an admin client through endpoint i, closed with the test.
func (f *ClusterFront) Client(tb testing.TB, i int) *kivik.Client {
	tb.Helper()
	return newClient(tb, f.Options(i))
}

// Split chooses which writes refused with 409 by a racing edit of the same
// revision are stored as a conflicting branch and answered 202 instead.
// nil turns it off.
func (f *ClusterFront) Split(fn func(id string, body map[string]json.RawMessage) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.split = fn
}

// Accept chooses which successful writes are answered 202 instead of 201.
// nil turns it off.
func (f *ClusterFront) Accept(fn func(id string, body map[string]json.RawMessage) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.accept = fn
}

// Splits returns how many conflicting branches the front stored.
func (f *ClusterFront) Splits() int64 { return f.splits.Load() }

// Accepted returns how many write answers the front turned into 202.
func (f *ClusterFront) Accepted() int64 { return f.accepted.Load() }

func (f *ClusterFront) rules() (split, accept func(string, map[string]json.RawMessage) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.split, f.accept
}

func (f *ClusterFront) serve(w http.ResponseWriter, r *http.Request) {
	split, accept := f.rules()
	if split == nil && accept == nil {
		f.proxy.ServeHTTP(w, r)
		return
	}
	path := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	dbSeg, rest, _ := strings.Cut(path, "/")
	switch {
	case strings.HasPrefix(dbSeg, "_") || rest == "":
	case r.Method == http.MethodPut && !strings.HasPrefix(rest, "_") && !strings.Contains(rest, "/"):
		id, err := url.PathUnescape(rest)
		if err == nil {
			f.servePut(w, r, dbSeg, id, split, accept)
			return
		}
	case r.Method == http.MethodPost && rest == "_bulk_docs":
		f.serveBulk(w, r, dbSeg, split, accept)
		return
	}
	f.proxy.ServeHTTP(w, r)
}

// forward sends a request to the server with the client's credentials.
func (f *ClusterFront) forward(r *http.Request, method, path, query string, body []byte) (int, []byte, error) {
	u := *f.target
	u.RawPath, u.Path, u.RawQuery = "/"+path, "", query
	if p, err := url.PathUnescape(u.RawPath); err == nil {
		u.Path = p
	}
	req, err := http.NewRequestWithContext(r.Context(), method, u.String(), bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	if a := r.Header.Get("Authorization"); a != "" {
		req.Header.Set("Authorization", a)
	}
	if c := r.Header.Get("Cookie"); c != "" {
		req.Header.Set("Cookie", c)
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return resp.StatusCode, out, err
}

func (f *ClusterFront) servePut(w http.ResponseWriter, r *http.Request, db, id string, split, accept func(string, map[string]json.RawMessage) bool) {
	in, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	status, out, err := f.forward(r, http.MethodPut, r.URL.EscapedPath()[1:], r.URL.RawQuery, in)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	var body map[string]json.RawMessage
	_ = json.Unmarshal(in, &body)
	switch {
	case status == http.StatusConflict && split != nil && split(id, body):
		if rev, ok := f.storeBranch(r, db, id, body); ok {
			f.accepted.Add(1)
			writeJSON(w, http.StatusAccepted, map[string]any{"ok": true, "id": id, "rev": rev})
			return
		}
	case status == http.StatusCreated && accept != nil && accept(id, body):
		f.accepted.Add(1)
		status = http.StatusAccepted
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(out)
}

func (f *ClusterFront) serveBulk(w http.ResponseWriter, r *http.Request, db string, split, accept func(string, map[string]json.RawMessage) bool) {
	in, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var req struct {
		Docs     []map[string]json.RawMessage `json:"docs"`
		NewEdits *bool                        `json:"new_edits"`
	}
	status, out, err := f.forward(r, http.MethodPost, r.URL.EscapedPath()[1:], r.URL.RawQuery, in)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	var rows []map[string]json.RawMessage
	if status != http.StatusCreated || json.Unmarshal(in, &req) != nil || (req.NewEdits != nil && !*req.NewEdits) ||
		json.Unmarshal(out, &rows) != nil {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write(out)
		return
	}
	docs := make(map[string]map[string]json.RawMessage, len(req.Docs))
	for _, d := range req.Docs {
		var id string
		_ = json.Unmarshal(d["_id"], &id)
		docs[id] = d
	}
	accepted := false
	for i, row := range rows {
		var id, errName string
		_ = json.Unmarshal(row["id"], &id)
		_ = json.Unmarshal(row["error"], &errName)
		body := docs[id]
		switch {
		case errName == "conflict" && split != nil && split(id, body):
			if rev, ok := f.storeBranch(r, db, id, body); ok {
				rows[i] = map[string]json.RawMessage{"ok": json.RawMessage("true"), "id": row["id"], "rev": mustJSON(rev)}
				accepted = true
			}
		case errName == "" && accept != nil && accept(id, body):
			accepted = true
		}
	}
	if accepted {
		f.accepted.Add(1)
		status = http.StatusAccepted
	}
	writeJSON(w, status, rows)
}

// storeBranch stores body, a write refused because its _rev is no longer
// the leaf, as a sibling of the current winner when both are children of
// that _rev: the conflict a cluster would have stored. It returns the new
// branch's revision.
func (f *ClusterFront) storeBranch(r *http.Request, db, id string, body map[string]json.RawMessage) (string, bool) {
	var parent string
	if json.Unmarshal(body["_rev"], &parent) != nil {
		return "", false
	}
	gen, parentHash, ok := strings.Cut(parent, "-")
	n, err := strconv.Atoi(gen)
	if !ok || err != nil {
		return "", false
	}
	status, cur, err := f.forward(r, http.MethodGet, db+"/"+url.PathEscape(id), "revs=true", nil)
	if err != nil || status != http.StatusOK {
		return "", false
	}
	var winner struct {
		Revisions struct {
			Start int      `json:"start"`
			IDs   []string `json:"ids"`
		} `json:"_revisions"`
	}
	if json.Unmarshal(cur, &winner) != nil || winner.Revisions.Start != n+1 || len(winner.Revisions.IDs) < 2 ||
		winner.Revisions.IDs[1] != parentHash {
		return "", false // not a race on the same revision
	}
	var h [16]byte
	if _, err := rand.Read(h[:]); err != nil {
		return "", false
	}
	hash := hex.EncodeToString(h[:])
	rev := fmt.Sprintf("%d-%s", n+1, hash)
	doc := make(map[string]json.RawMessage, len(body)+2)
	for k, v := range body {
		doc[k] = v
	}
	doc["_id"] = mustJSON(id)
	doc["_rev"] = mustJSON(rev)
	doc["_revisions"] = mustJSON(map[string]any{"start": n + 1, "ids": []string{hash, parentHash}})
	req := mustJSON(map[string]any{"docs": []any{doc}, "new_edits": false})
	status, _, err = f.forward(r, http.MethodPost, db+"/_bulk_docs", "", req)
	if err != nil || status != http.StatusCreated {
		return "", false
	}
	f.splits.Add(1)
	return rev, true
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("couchtest: %v", err)) // only plain values are marshalled here
	}
	return b
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
