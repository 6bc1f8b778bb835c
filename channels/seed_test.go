package channels_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/docstate/docstate/channels"
	"github.com/docstate/docstate/internal/couchtest"
)

// CouchDB's /_scheduler/docs answers, which PouchDB Server has no endpoint
// for (and whose failing replications take PouchDB Server down), from a
// fake that answers as CouchDB 3.4 does: crashing and failed seeds carry
// the scheduler's error as their reason; a server without a scheduler, or
// a document not scheduled yet, falls back to the document's own state.
func TestSeedStateFromTheScheduler(t *testing.T) {
	answers := map[string]struct {
		status int
		body   string
	}{
		"/_scheduler/docs/_replicator/crash": {200, `{"state":"crashing","info":{"error":"unauthorized: unauthorized to access or create database http://127.0.0.1:5984/tmpl/"}}`},
		"/_scheduler/docs/_replicator/fail":  {200, `{"state":"failed","info":{"error":"db_not_found: could not open http://127.0.0.1:5984/x/"}}`},
		"/_scheduler/docs/_replicator/done":  {200, `{"state":"completed","info":{"revisions_checked":3}}`},
		"/_scheduler/docs/_replicator/init":  {200, `{"state":"initializing","info":null}`},
		"/_scheduler/docs/_replicator/none":  {404, `{"error":"not_found","reason":"missing"}`},
	}
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "admin" || p != "pw" {
			http.Error(w, `{"error":"unauthorized"}`, http.StatusUnauthorized)
			return
		}
		a, ok := answers[r.URL.Path]
		if !ok {
			a.status, a.body = 400, `{"error":"bad_request"}`
		}
		w.WriteHeader(a.status)
		_, _ = w.Write([]byte(a.body))
	}))
	defer fake.Close()
	admin := couchtest.Client(t)
	ch, err := channels.New(channels.Options{Client: admin, DB: couchtest.NewDB(t, admin),
		Templates: map[string]string{"t": "tmpl"}, Replicator: channels.Replicator{URL: fake.URL, Username: "admin", Password: "pw"}})
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]struct {
		state string
		ok    bool
	}{
		"crash": {channels.SeedCrashing, true}, "fail": {channels.SeedFailed, true}, "done": {channels.SeedCompleted, true},
		"init": {channels.SeedPending, true}, "none": {"", false}, "other": {"", false},
	} {
		state, reason, ok, err := ch.SchedulerState(context.Background(), id)
		if err != nil || ok != want.ok || state != want.state {
			t.Errorf("%s: state %q ok %v err %v, want %q %v", id, state, ok, err, want.state, want.ok)
		}
		if (id == "crash" || id == "fail") && reason == "" {
			t.Errorf("%s: no reason", id)
		}
	}
	if _, err := channels.New(channels.Options{Client: admin, DB: couchtest.NewDB(t, admin),
		Templates: map[string]string{"t": "userctl-0"}, Replicator: channels.Replicator{URL: fake.URL}}); err == nil {
		t.Error("a control database accepted as a template")
	}
	if _, err := channels.New(channels.Options{Client: admin, DB: couchtest.NewDB(t, admin),
		Templates: map[string]string{"t": "tmpl"}}); err == nil {
		t.Error("templates accepted without a replicator URL")
	}
}
