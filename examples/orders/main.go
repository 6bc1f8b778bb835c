// Command orders is a docstate daemon with one extra handler set of its
// own: the pattern for building your own binary. It runs docstate's
// built-in sets plus an "orders" set that accepts or rejects orders.
//
//	go run ./examples/orders run --config docstate.yaml
package main

import (
	"context"
	"os"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/workflow"
)

// orders is a handler set. Listing it in main, with the compile-time check
// below, is all the registration there is.
type orders struct{}

var _ handlers.Set = orders{}

func (orders) Name() string { return "orders" }

func (orders) Register(reg *workflow.Registry) error {
	return reg.Register(workflow.Spec{
		Type: "order", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(accept),
	})
}

func accept(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	var order struct {
		Items []string `json:"items"`
	}
	if err := doc.Decode(&order); err != nil {
		return workflow.Result{}, workflow.Terminal(err)
	}
	if len(order.Items) == 0 {
		return workflow.Transition("rejected").Set("reason", "an order needs at least one item"), nil
	}
	return workflow.Transition("accepted").Set("item_count", len(order.Items)), nil
}

// revision and modified are written by the linker (scripts/build, see
// cmd/docstate): the VCS revision for builds where Go stamps none.
var revision, modified string

func main() {
	os.Exit(cli.Main(cli.Options{
		Revision: revision,
		Modified: modified,
		Sets: func(env handlers.Env) ([]handlers.Set, error) {
			sets, err := handlers.Builtin(env)
			return append(sets, orders{}), err
		},
	}))
}
