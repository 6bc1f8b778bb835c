package couch

import (
	"context"
	"fmt"
	"net/http"

	kivik "github.com/go-kivik/kivik/v4"
)

type allRevsKey struct{}

// OpenAllRevs asks for every leaf revision of a document, deleted ones
// included (GET with open_revs=all). On a cluster this is the read that
// sees every branch: the coordinator merges the leaves the replicas it
// heard from hold, where a plain GET with conflicts=true answers one
// replica's view and can miss a branch only another replica has.
//
// kivik's OpenRevs sends the revisions as a JSON list and cannot say
// "all" (CouchDB refuses ["all"] as a bad revision), so the transport of a
// client from NewClient rewrites the list for a request with this
// context. The answer is multipart (CouchDB) or JSON (PouchDB Server); see
// workflow's reading of it.
func OpenAllRevs(ctx context.Context, db *kivik.DB, id string) *kivik.ResultSet {
	return db.OpenRevs(context.WithValue(ctx, allRevsKey{}, true), id, nil)
}

// revsTransport turns the open_revs=null kivik sends for no revisions into
// open_revs=all, for requests made by OpenAllRevs only.
type revsTransport struct{ next http.RoundTripper }

func (t revsTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if all, _ := r.Context().Value(allRevsKey{}).(bool); all {
		q := r.URL.Query()
		if q.Get("open_revs") != "null" {
			return nil, fmt.Errorf("couch: open_revs=all request sent as %q", q.Get("open_revs"))
		}
		q.Set("open_revs", "all")
		r = r.Clone(r.Context())
		r.URL.RawQuery = q.Encode()
	}
	return t.next.RoundTrip(r)
}

// Replicas returns how many copies of each document the database keeps: n
// of its cluster settings (GET /{db}), which CouchDB 2 and later report,
// 1 on a single-node setup with n=1. A server that reports none (PouchDB
// Server, CouchDB 1) keeps one.
func Replicas(ctx context.Context, db *kivik.DB) (int, error) {
	st, err := db.Stats(ctx)
	if err != nil {
		return 0, fmt.Errorf("database info of %q: %w", db.Name(), err)
	}
	if st.Cluster == nil || st.Cluster.Replicas < 1 {
		return 1, nil
	}
	return st.Cluster.Replicas, nil
}
