package workflowtest

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/workflow"
)

// Options returns engine options with intervals short enough for tests:
// retries in tens of milliseconds, checkpoints every 100ms, resync scans
// every 300ms. Warnings and errors go to the test's output; set
// DOCSTATE_TEST_LOG=debug to see everything.
func Options(tb testing.TB) workflow.Options {
	return workflow.Options{
		Workers:            8,
		HandlerTimeout:     5 * time.Second,
		Lease:              10 * time.Second,
		RetryBase:          50 * time.Millisecond,
		RetryMax:           200 * time.Millisecond,
		FeedTimeout:        2 * time.Second,
		FeedRetryMin:       50 * time.Millisecond,
		FeedRetryMax:       500 * time.Millisecond,
		CheckpointInterval: 100 * time.Millisecond,
		ResyncInterval:     300 * time.Millisecond,
		DrainTimeout:       5 * time.Second,
		Logger:             Logger(tb),
	}
}

// Logger writes to the test's output: errors only, everything with
// DOCSTATE_TEST_LOG=debug, warnings and up with go test -v.
func Logger(tb testing.TB) *slog.Logger {
	level := slog.LevelError
	switch {
	case os.Getenv("DOCSTATE_TEST_LOG") == "debug":
		level = slog.LevelDebug
	case testing.Verbose():
		level = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: level}))
}

// Running is an engine running in the background of a test.
type Running struct {
	*workflow.Engine
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// Start runs an engine on db with reg's handlers until Stop or the end of
// the test.
func Start(tb testing.TB, db *kivik.DB, reg *workflow.Registry, opts workflow.Options) *Running {
	tb.Helper()
	eng, err := workflow.New(db, reg, opts)
	if err != nil {
		tb.Fatalf("workflow.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Running{Engine: eng, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- eng.Run(ctx) }()
	tb.Cleanup(func() { r.Stop(tb) })
	return r
}

// Stop ends the engine (a graceful drain bounded by its DrainTimeout) and
// waits for Run to return. It may be called more than once.
func (r *Running) Stop(tb testing.TB) {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				tb.Errorf("engine Run: %v", err)
			}
		case <-time.After(60 * time.Second):
			tb.Error("engine did not stop within 60s")
		}
	})
}

// Eventually polls cond every 50ms until it reports true, and fails the
// test with what and cond's last message if timeout passes first.
func Eventually(tb testing.TB, timeout time.Duration, what string, cond func() (ok bool, msg string)) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		time.Sleep(50 * time.Millisecond)
	}
	tb.Fatalf("%s: not reached within %v: %s", what, timeout, last)
}
