package couch

import (
	"context"
	"io"
	"net/http"
	"sync/atomic"
	"time"
)

// Activity watches the requests made with a context from WithActivity: when
// one was sent, and when the server last sent anything for it (response
// headers, or any part of a body: a feed's heartbeat newline too). A feed
// follower uses it to tell a longpoll that waits on a live server (the
// server sends heartbeats) from one on a dead connection (nothing comes).
//
// Only clients of NewClient report activity; Wired tells whether one did.
type Activity struct {
	seen  func()
	wired atomic.Bool
	heard atomic.Bool
	last  atomic.Int64
}

// NewActivity returns an Activity that calls seen (may be nil) each time the
// server sends something. seen runs on the goroutine that reads the response
// and must be fast.
func NewActivity(seen func()) *Activity { return &Activity{seen: seen} }

// Wired reports whether a request with the Activity went through a client
// of NewClient, so that heartbeats are seen. False for other clients: then
// only the end of a request tells the caller the server answered.
func (a *Activity) Wired() bool { return a.wired.Load() }

// Heard reports whether the server sent anything yet (seen through a
// client of NewClient).
func (a *Activity) Heard() bool { return a.heard.Load() }

// Quiet returns how long the server has sent nothing: since the request was
// sent or since the server last sent something, whichever is later. Zero
// while no request went through a client of NewClient.
func (a *Activity) Quiet() time.Duration {
	last := a.last.Load()
	if last == 0 {
		return 0
	}
	return time.Since(time.Unix(0, last))
}

func (a *Activity) sent() {
	a.wired.Store(true)
	a.last.Store(time.Now().UnixNano())
}

func (a *Activity) saw() {
	a.heard.Store(true)
	a.last.Store(time.Now().UnixNano())
	if a.seen != nil {
		a.seen()
	}
}

type activityKey struct{}

// WithActivity returns a context whose requests report to a.
func WithActivity(ctx context.Context, a *Activity) context.Context {
	return context.WithValue(ctx, activityKey{}, a)
}

// activityTransport reports requests and what comes back to the Activity in
// their context; requests without one pass through untouched.
type activityTransport struct{ base http.RoundTripper }

func (t activityTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	a, _ := req.Context().Value(activityKey{}).(*Activity)
	if a == nil {
		return t.base.RoundTrip(req)
	}
	a.sent()
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	a.saw()
	resp.Body = activityBody{resp.Body, a}
	return resp, nil
}

// activityBody reports every read that returned bytes.
type activityBody struct {
	io.ReadCloser
	a *Activity
}

func (b activityBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.a.saw()
	}
	return n, err
}
