package couch

import (
	"context"
	"net/http"
	"sync/atomic"
)

// WriteStatus records the HTTP status of the writes made with a context from
// RecordStatus. kivik's Put and BulkDocs return a revision for both 201
// Created and 202 Accepted, and on a CouchDB cluster the difference matters:
// 202 means fewer replicas than the write quorum took the write, so another
// writer's conflicting edit may have been taken by the others and the
// document may now hold a stored conflict. For _bulk_docs the status is the
// request's: rows carry none of their own.
type WriteStatus struct {
	// accepted is set by any 202 seen; created by any 201. Both are
	// atomic because kivik may retry or several writes may share a context.
	accepted, created atomic.Bool
}

type statusKey struct{}

// RecordStatus returns a context whose writes through a client from
// NewClient record their status in the returned WriteStatus.
func RecordStatus(ctx context.Context) (context.Context, *WriteStatus) {
	st := &WriteStatus{}
	return context.WithValue(ctx, statusKey{}, st), st
}

// StatusFrom returns the WriteStatus a context records into, or nil.
func StatusFrom(ctx context.Context) *WriteStatus {
	st, _ := ctx.Value(statusKey{}).(*WriteStatus)
	return st
}

// Certain reports whether every write seen was answered 201 Created (and
// at least one was): the write quorum took it. A write whose status was
// never seen (a client not from NewClient) is not certain.
func (s *WriteStatus) Certain() bool {
	return s != nil && s.created.Load() && !s.accepted.Load()
}

// Accepted reports whether a write was answered 202 Accepted.
func (s *WriteStatus) Accepted() bool { return s != nil && s.accepted.Load() }

// Observe records status as if a write had been answered with it, for
// writers that pass a status on from a request made under another context
// (a group commit's _bulk_docs).
func (s *WriteStatus) Observe(status int) {
	if s == nil {
		return
	}
	switch status {
	case http.StatusCreated:
		s.created.Store(true)
	case http.StatusAccepted:
		s.accepted.Store(true)
	}
}

// statusTransport fills the WriteStatus of a request's context. A request
// without one costs a context lookup.
type statusTransport struct{ next http.RoundTripper }

func (t statusTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if err == nil {
		if st := StatusFrom(r.Context()); st != nil {
			st.Observe(resp.StatusCode)
		}
	}
	return resp, err
}
