package workflow_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// keyLog records the idempotency key each run of a document saw.
type keyLog struct {
	mu   sync.Mutex
	keys map[string][]string
}

func (l *keyLog) add(id, key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.keys[id] = append(l.keys[id], key)
	return len(l.keys[id])
}

func (l *keyLog) get(id string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.keys[id])
}

// An unsafe operation keeps its idempotency key until a run's result is
// written: through the takeover of a crashed run's claim and through failed
// runs after it. Otherwise a mail the crashed run may have sent and the one
// a later run sends would carry different codes.
func TestKeyStaysUntilResultWritten(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	log := &keyLog{keys: map[string][]string{}}
	crash := make(chan struct{})
	handler := workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		run := log.add(doc.ID, doc.Claim.Key)
		switch doc.ID {
		case "crash-then-fail":
			switch run {
			case 1: // the side effect is under way when the engine dies
				select {
				case <-crash:
				case <-ctx.Done():
				}
				return workflow.Result{}, ctx.Err()
			case 2, 3:
				return workflow.Result{}, errors.New("smtp: connection refused")
			}
		case "fail":
			if run == 1 {
				return workflow.Result{}, errors.New("smtp: connection refused")
			}
		case "stay":
			if run == 1 { // a result is written: the next run is a new operation
				return workflow.Stay().WakeAt(time.Now().Add(50 * time.Millisecond)), nil
			}
		}
		return workflow.Transition("done"), nil
	})
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "mail", State: "new", Mode: workflow.Unsafe, Handler: handler,
		Timeout: 5 * time.Second, Lease: 6 * time.Second, OnExpired: workflow.RetryExpired, MaxAttempts: 5,
		Backoff: func(int) time.Duration { return 20 * time.Millisecond }})
	for _, id := range []string{"crash-then-fail", "fail", "stay"} {
		if _, err := db.Put(context.Background(), id, map[string]any{"type": "mail", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}

	opts := workflowtest.Options(t)
	opts.DrainTimeout = time.Millisecond // a hard stop leaves the claim behind
	eng := workflowtest.Start(t, db, reg, opts)
	workflowtest.Eventually(t, 30*time.Second, "first run of every doc", func() (bool, string) {
		n := len(log.get("crash-then-fail"))
		return n == 1 && get(t, db, "fail").Fields["state"] == "done" && get(t, db, "stay").Fields["state"] == "done",
			fmt.Sprintf("crash-then-fail ran %d times", n)
	})
	eng.Stop(t)
	close(crash)

	eng2 := workflowtest.Start(t, db, reg, workflowtest.Options(t))
	workflowtest.Eventually(t, 60*time.Second, "crashed doc done", func() (bool, string) {
		d := get(t, db, "crash-then-fail")
		return d.Fields["state"] == "done", fmt.Sprint(d.Fields["state"], " runs ", len(log.get("crash-then-fail")))
	})
	eng2.Stop(t)

	same := func(id string, runs int) {
		t.Helper()
		keys := log.get(id)
		if len(keys) != runs {
			t.Fatalf("%s ran %d times, want %d: %v", id, len(keys), runs, keys)
		}
		for _, k := range keys {
			if k != id+"/new/1" {
				t.Errorf("%s: keys %v, want every run to use %s/new/1", id, keys, id)
				return
			}
		}
	}
	same("crash-then-fail", 4)
	same("fail", 2)
	if keys := log.get("stay"); !slices.Equal(keys, []string{"stay/new/1", "stay/new/2"}) {
		t.Errorf("stay: keys %v, want a new key after the written stay", keys)
	}
	for _, id := range []string{"crash-then-fail", "fail", "stay"} {
		if d := get(t, db, id); d.Meta != nil && (d.Meta.Claim != nil || d.Meta.Key != "") {
			t.Errorf("%s keeps a claim or key after its result: %s", id, mustJSON(d.Meta))
		}
	}
}
