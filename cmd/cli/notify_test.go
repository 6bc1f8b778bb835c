package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
)

// syncBuffer is a bytes.Buffer the daemon's logger and the test can share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// fakeNotifySocket listens where NOTIFY_SOCKET points, like systemd does,
// and returns the channel its datagrams arrive on.
func fakeNotifySocket(t *testing.T) <-chan string {
	t.Helper()
	// Socket paths are limited to 108 bytes; t.TempDir() can be long.
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	msgs := make(chan string, 1000)
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(msgs)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return // closed by the cleanup below
			}
			msgs <- string(buf[:n])
		}
	})
	t.Cleanup(func() { _ = conn.Close(); wg.Wait() })
	t.Setenv("NOTIFY_SOCKET", path)
	return msgs
}

// hasLine reports whether the sd_notify message msg has the line line.
func hasLine(msg, line string) bool {
	for _, l := range strings.Split(msg, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

// TestRunNotifiesSystemd runs the daemon under a fake systemd: READY=1 once
// the feed is followed, WATCHDOG=1 pings while it is healthy, STOPPING=1
// when the stop begins and nothing after it.
func TestRunNotifiesSystemd(t *testing.T) {
	msgs := fakeNotifySocket(t)
	t.Setenv("WATCHDOG_USEC", "300000") // 300ms: a ping every 150ms
	t.Setenv("WATCHDOG_PID", "")

	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	for i := range 5 {
		if _, err := db.Put(ctx, fmt.Sprintf("j%d", i), map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	stderr := &syncBuffer{}
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil },
		Stderr:  stderr,
		Environ: []string{},
	})
	root.SetArgs([]string{"run", "--config", writeConfig(t, db.Name(), "http:\n  listen: \"\"\n")})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(runCtx) }()
	defer func() { cancel(); <-done; done <- nil }()

	var got []string
	next := func(what string) string {
		t.Helper()
		select {
		case m := <-msgs:
			got = append(got, m)
			return m
		case err := <-done:
			done <- err
			t.Fatalf("run ended (%v) while waiting for %s; messages %q; log:\n%s", err, what, got, stderr.String())
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s; messages %q; log:\n%s", what, got, stderr.String())
		}
		return ""
	}
	for m := next("READY=1"); !hasLine(m, "READY=1"); m = next("READY=1") {
		if hasLine(m, "WATCHDOG=1") {
			t.Fatalf("WATCHDOG=1 before READY=1: %q", got)
		}
	}
	if ready := got[len(got)-1]; !strings.Contains(ready, "STATUS=following "+db.Name()) {
		t.Errorf("READY=1 message %q lacks the status", ready)
	}
	pings := 0
	for pings < 3 {
		if hasLine(next("WATCHDOG=1"), "WATCHDOG=1") {
			pings++
		}
	}

	cancel()
	for m := next("STOPPING=1"); !hasLine(m, "STOPPING=1"); m = next("STOPPING=1") {
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v", err)
		}
		done <- nil
	case <-time.After(30 * time.Second):
		t.Fatal("run did not stop after cancel")
	}
	// Nothing follows STOPPING=1 (the datagrams are queued in the socket;
	// a short wait lets the reader catch up).
	for quiet := false; !quiet; {
		select {
		case m := <-msgs:
			t.Errorf("message after STOPPING=1: %q", m)
		case <-time.After(300 * time.Millisecond):
			quiet = true
		}
	}
	log := stderr.String()
	for _, want := range []string{"systemd notified: ready", "stop requested; draining", "engine stopped"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	if i, j := strings.Index(log, "stop requested"), strings.Index(log, "engine draining"); i < 0 || j < i {
		t.Errorf("the engine drained before STOPPING=1 was sent:\n%s", log)
	}
	t.Logf("sd_notify messages: %q", got)
}
