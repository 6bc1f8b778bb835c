package cli

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// recorder collects sd_notify messages in order.
type recorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *recorder) notify(s string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, s)
	return nil
}

func (r *recorder) snapshot() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

// index returns the position of the first message at or after from with a
// line starting with prefix, or -1.
func index(msgs []string, from int, prefix string) int {
	for i := from; i < len(msgs); i++ {
		for _, line := range strings.Split(msgs[i], "\n") {
			if strings.HasPrefix(line, prefix) {
				return i
			}
		}
	}
	return -1
}

// lockedBuffer is a bytes.Buffer safe for a logger and a test to share.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestNotifierPingsOnlyWhileReady drives the notifier with a fake readiness:
// no READY=1 and no WATCHDOG=1 before the feed is healthy, pings while it is,
// none (and a warning) while it is not, pings again once it recovers.
func TestNotifierPingsOnlyWhileReady(t *testing.T) {
	t.Parallel()
	var unhealthy atomic.Pointer[error]
	setReady := func(err error) { unhealthy.Store(&err) }
	setReady(errors.New("the changes feed has not been read yet"))
	rec := &recorder{}
	logs := &lockedBuffer{}
	n := &notifier{
		notify:   rec.notify,
		ready:    func() error { return *unhealthy.Load() },
		status:   func() string { return "following test" },
		watchdog: 20 * time.Millisecond,
		poll:     2 * time.Millisecond,
		log:      slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { n.run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	// Not ready: ten watchdog intervals pass with neither READY nor a ping.
	time.Sleep(200 * time.Millisecond)
	if msgs := rec.snapshot(); index(msgs, 0, "READY=1") >= 0 || index(msgs, 0, "WATCHDOG=1") >= 0 {
		t.Fatalf("READY or WATCHDOG sent before the feed was healthy: %q", msgs)
	}

	setReady(nil)
	waitFor(t, "READY=1 and two pings", func() bool {
		msgs := rec.snapshot()
		r := index(msgs, 0, "READY=1")
		return r >= 0 && index(msgs, index(msgs, r, "WATCHDOG=1")+1, "WATCHDOG=1") >= 0
	})

	setReady(errors.New("no answer on the changes feed for 1m40s (limit 1m35s)"))
	// The first unhealthy tick reports itself; from then on every tick sees
	// the error, and the single goroutine sends no ping after it.
	waitFor(t, "unhealthy status", func() bool { return index(rec.snapshot(), 0, "STATUS=feed unhealthy") >= 0 })
	time.Sleep(200 * time.Millisecond)
	msgs := rec.snapshot()
	bad := index(msgs, 0, "STATUS=feed unhealthy")
	if i := index(msgs, bad, "WATCHDOG=1"); i >= 0 {
		t.Fatalf("WATCHDOG=1 sent while the feed was unhealthy (message %d of %q)", i, msgs)
	}
	if !strings.Contains(logs.String(), "skipping systemd watchdog ping") || !strings.Contains(logs.String(), "limit 1m35s") {
		t.Fatalf("no warning with the reason for the skipped ping:\n%s", logs.String())
	}

	setReady(nil)
	waitFor(t, "pings after recovery", func() bool { return index(rec.snapshot(), len(msgs), "WATCHDOG=1") >= 0 })

	cancel()
	wg.Wait()
	n.stopping()
	msgs = rec.snapshot()
	if last := msgs[len(msgs)-1]; !strings.HasPrefix(last, "STOPPING=1\n") {
		t.Fatalf("last message %q, want STOPPING=1", last)
	}
}

// TestNotifierNeverReadyStopsWithContext: a daemon whose feed never answers
// sends no READY=1 and no ping, and the notifier still ends with ctx.
func TestNotifierNeverReadyStopsWithContext(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	n := &notifier{
		notify:   rec.notify,
		ready:    func() error { return errors.New("the changes feed has not been read yet") },
		status:   func() string { return "x" },
		watchdog: 10 * time.Millisecond,
		poll:     time.Millisecond,
		log:      slog.New(slog.DiscardHandler),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { n.run(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("notifier did not return after its context ended")
	}
	if msgs := rec.snapshot(); len(msgs) != 1 || !strings.HasPrefix(msgs[0], "STATUS=starting") {
		t.Fatalf("messages %q, want only the starting status", msgs)
	}
}

// TestNotifierOffWithoutSocket: without NOTIFY_SOCKET there is no notifier,
// and the nil notifier's methods do nothing.
func TestNotifierOffWithoutSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if n := systemdNotifier(slog.New(slog.DiscardHandler), nil, "db"); n != nil {
		t.Fatalf("notifier %+v without NOTIFY_SOCKET", n)
	}
	var n *notifier
	n.run(context.Background())
	n.stopping()
}
