package workflow

import (
	"log/slog"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
)

// A feed paused by backpressure is ready while work finishes, and not
// once work stops finishing.
func TestReadyUnderBackpressure(t *testing.T) {
	client, err := kivik.New("couch", "http://127.0.0.1:1/")
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(client.DB("x"), NewRegistry(), Options{FeedTimeout: time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour).UnixNano()
	e.feedContact.Store(old)
	e.followed.Store(true)
	if e.Ready() == nil {
		t.Fatal("ready with a feed silent for an hour")
	}
	e.backpressured.Store(true)
	e.progress.Store(time.Now().UnixNano())
	if err := e.Ready(); err != nil {
		t.Fatalf("busy daemon reported unready: %v", err)
	}
	e.progress.Store(old)
	if e.Ready() == nil {
		t.Fatal("ready while paused and no work finishing")
	}
}
