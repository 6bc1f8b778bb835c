package handlers_test

import (
	"context"
	"strings"
	"testing"

	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/workflow"
)

func set(name, typ string) handlers.Set {
	return handlers.Func{SetName: name, Fn: func(reg *workflow.Registry) error {
		return reg.Register(workflow.Spec{Type: typ, State: "new", Mode: workflow.Safe,
			Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
				return workflow.Stay(), nil
			})})
	}}
}

func TestRegisterNamesTheFailingSet(t *testing.T) {
	reg := workflow.NewRegistry()
	if err := handlers.Register(reg, set("a", "x"), set("b", "y")); err != nil {
		t.Fatal(err)
	}
	err := handlers.Register(workflow.NewRegistry(), set("a", "x"), set("b", "x"))
	if err == nil || !strings.Contains(err.Error(), `set "b"`) || !strings.Contains(err.Error(), "already registered") {
		t.Fatalf("err = %v, want the duplicate named with its set", err)
	}
	err = handlers.Register(workflow.NewRegistry(), set("a", "x"), set("a", "y"))
	if err == nil || !strings.Contains(err.Error(), "listed twice") {
		t.Fatalf("err = %v, want a set listed twice refused", err)
	}
}
