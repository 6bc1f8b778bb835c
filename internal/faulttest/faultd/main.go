// Command faultd is the daemon the fault-injection tests kill: docstate's
// built-in sets (from the config) plus a "jobs" set with a safe handler and
// an unsafe one whose side effect is a line in a ledger file, appended and
// fsynced before the handler returns, so it survives SIGKILL.
//
//	FAULTD_LEDGER=/tmp/ledger faultd run --config docstate.yaml
package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/workflow"
)

// jobs is the test workload's handler set.
type jobs struct{ ledger string }

var _ handlers.Set = jobs{}

func (jobs) Name() string { return "jobs" }

func (j jobs) Register(reg *workflow.Registry) error {
	return errors.Join(
		reg.Register(workflow.Spec{Type: "safejob", State: "new", Mode: workflow.Safe,
			Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
				return workflow.Transition("done"), nil
			})}),
		reg.Register(workflow.Spec{Type: "unsafejob", State: "new", Mode: workflow.Unsafe, OnExpired: workflow.RetryExpired,
			Handler: workflow.HandlerFunc(j.sideEffect)}),
	)
}

// sideEffect records the run durably, under its idempotency key, then
// takes a moment, as real side effects do: a kill can land before, during
// or after the record.
func (j jobs) sideEffect(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	f, err := os.OpenFile(j.ledger, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return workflow.Result{}, err
	}
	_, err = fmt.Fprintf(f, "%s %s\n", doc.ID, doc.Claim.Key)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return workflow.Result{}, err
	}
	select {
	case <-time.After(time.Duration(rand.N(50)) * time.Millisecond):
	case <-ctx.Done():
		return workflow.Result{}, ctx.Err()
	}
	return workflow.Transition("done").Set("key", doc.Claim.Key), nil
}

func main() {
	ledger := os.Getenv("FAULTD_LEDGER")
	if ledger == "" {
		fmt.Fprintln(os.Stderr, "faultd: FAULTD_LEDGER must name the ledger file")
		os.Exit(2)
	}
	os.Exit(cli.Main(cli.Options{
		Sets: func(env handlers.Env) ([]handlers.Set, error) {
			sets, err := handlers.Builtin(env)
			return append(sets, jobs{ledger: ledger}), err
		},
	}))
}
