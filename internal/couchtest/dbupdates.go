package couchtest

import (
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// DBUpdatesServer fronts the test server with the one endpoint PouchDB
// Server lacks and Apache CouchDB has: GET /_db_updates (feed=normal or
// longpoll, since=now or a number, timeout, limit), answering
// {"results":[{"db_name","type","seq"}],"last_seq"} as CouchDB 3 does.
// Every other request is passed through unchanged; each successful write
// that passes (PUT, POST, DELETE, COPY under /{db}) becomes an event:
// "created" for PUT /{db}, "deleted" for DELETE /{db}, "updated" otherwise.
// Only writes made through it are seen, as CouchDB sees only its own.
//
// It exists so that the daemon's _db_updates mode runs against real
// databases in tests; the feed it serves is an emulation, and the real
// endpoint's behaviour (its seqs are opaque strings, it needs the
// _global_changes database) is CouchDB's.
type DBUpdatesServer struct {
	srv  *httptest.Server
	opts couch.Options

	mu     sync.Mutex
	events []dbEvent
	notify chan struct{} // closed and replaced at each event
}

type dbEvent struct {
	DB   string `json:"db_name"`
	Type string `json:"type"`
	Seq  string `json:"seq"`
}

// NewDBUpdatesServer starts the front for the package's test server; it
// is closed when the test ends.
func NewDBUpdatesServer(tb testing.TB) *DBUpdatesServer {
	tb.Helper()
	opts := Options(tb)
	target, err := url.Parse(opts.URL)
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	s := &DBUpdatesServer{notify: make(chan struct{})}
	proxy := httputil.NewSingleHostReverseProxy(target)
	// A feed request cancelled by its client is routine here, not news.
	proxy.ErrorLog = log.New(io.Discard, "", 0)
	proxy.ModifyResponse = func(resp *http.Response) error {
		s.observe(resp.Request, resp.StatusCode)
		return nil
	}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/_db_updates" {
			s.serveUpdates(w, r)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	tb.Cleanup(s.srv.Close)
	s.opts = opts
	s.opts.URL = s.srv.URL
	return s
}

// Options returns admin options that reach the server through the front.
func (s *DBUpdatesServer) Options() couch.Options { return s.opts }

// Client returns an admin client through the front, closed with the test.
func (s *DBUpdatesServer) Client(tb testing.TB) *kivik.Client {
	tb.Helper()
	return newClient(tb, s.opts)
}

// Events returns how many database events the feed holds.
func (s *DBUpdatesServer) Events() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.events)
}

func (s *DBUpdatesServer) observe(r *http.Request, status int) {
	if status >= 300 {
		return
	}
	switch r.Method {
	case http.MethodPut, http.MethodPost, http.MethodDelete, "COPY":
	default:
		return
	}
	path := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	seg, rest, _ := strings.Cut(path, "/")
	name, err := url.PathUnescape(seg)
	if err != nil || name == "" || strings.HasPrefix(name, "_") {
		return
	}
	typ := "updated"
	switch {
	case rest == "" && r.Method == http.MethodPut:
		typ = "created"
	case rest == "" && r.Method == http.MethodDelete:
		typ = "deleted"
	case strings.HasPrefix(rest, "_local/"):
		return // CouchDB does not report local documents either
	case r.Method == http.MethodPost && strings.HasPrefix(rest, "_") && rest != "_bulk_docs" && rest != "_purge":
		return // queries sent as POST (_find, _all_docs, _changes, _bulk_get…) write nothing
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, dbEvent{DB: name, Type: typ, Seq: strconv.Itoa(len(s.events) + 1)})
	close(s.notify)
	s.notify = make(chan struct{})
}

func (s *DBUpdatesServer) serveUpdates(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	feed := q.Get("feed")
	if feed != "" && feed != "normal" && feed != "longpoll" {
		http.Error(w, `{"error":"bad_request","reason":"this test front serves feed=normal and longpoll only"}`, http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	since := 0
	switch v := q.Get("since"); v {
	case "", "0":
	case "now":
		since = len(s.events)
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			s.mu.Unlock()
			http.Error(w, `{"error":"bad_request","reason":"invalid since"}`, http.StatusBadRequest)
			return
		}
		since = n
	}
	s.mu.Unlock()
	timeout := 60 * time.Second
	if ms, err := strconv.Atoi(q.Get("timeout")); err == nil && ms >= 0 {
		timeout = time.Duration(ms) * time.Millisecond
	}
	limit := -1
	if n, err := strconv.Atoi(q.Get("limit")); err == nil && n > 0 {
		limit = n
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		events, notify := s.events, s.notify
		s.mu.Unlock()
		if len(events) > since || feed != "longpoll" {
			out := events[min(since, len(events)):]
			if limit > 0 && len(out) > limit {
				out = out[:limit]
			}
			last := strconv.Itoa(since + len(out))
			w.Header().Set("Content-Type", "application/json")
			// Results first, as CouchDB writes them: kivik tells the
			// feed's kind from the first key.
			_ = json.NewEncoder(w).Encode(struct {
				Results []dbEvent `json:"results"`
				LastSeq string    `json:"last_seq"`
			}{append([]dbEvent{}, out...), last})
			return
		}
		select {
		case <-notify:
		case <-deadline.C:
			feed = "normal" // answer what there is: nothing
		case <-r.Context().Done():
			return
		}
	}
}
