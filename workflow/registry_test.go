package workflow

import (
	"context"
	"strings"
	"testing"
	"time"
)

var nop = HandlerFunc(func(context.Context, *Doc) (Result, error) { return Stay(), nil })

func TestRegisterRejectsDuplicatesAndBadSpecs(t *testing.T) {
	r := NewRegistry()
	if err := r.Register(Spec{Type: "t", State: "s", Mode: Safe, Handler: nop}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		spec Spec
		want string
	}{
		{Spec{Type: "t", State: "s", Mode: Unsafe, Handler: nop}, "already registered"},
		{Spec{State: "s", Mode: Safe, Handler: nop}, "type is empty"},
		{Spec{Type: "t", State: "x", Handler: nop}, "mode must be"},
		{Spec{Type: "t", State: "x", Mode: Safe}, "handler is nil"},
		{Spec{Type: "t", State: "x", Mode: Safe, Handler: nop, Timeout: time.Minute, Lease: time.Second}, "must exceed"},
		{Spec{Type: "t", State: "x", Mode: Safe, Handler: nop, ErrorState: "x"}, "must differ"},
		{Spec{Type: "t\n", State: "x", Mode: Safe, Handler: nop}, "control character"},
		{Spec{Type: "t", State: "x", Mode: Safe, Handler: nop, MaxAttempts: -1}, "negative"},
	}
	for _, tt := range tests {
		err := r.Register(tt.spec)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Register(%+v) = %v, want error containing %q", tt.spec, err, tt.want)
		}
	}
	if r.Len() != 1 || !r.HasType("t") || r.HasType("x") {
		t.Fatalf("registry changed by failed registrations: %d specs", r.Len())
	}
}

func TestResultRejectsReservedFields(t *testing.T) {
	for _, f := range []string{"_id", "_rev", "type", "state", "docstate", "_deleted", ""} {
		if err := Stay().Set(f, 1).validate(); err == nil {
			t.Errorf("Set(%q) accepted", f)
		}
		if err := Stay().Unset(f).validate(); err == nil {
			t.Errorf("Unset(%q) accepted", f)
		}
	}
	if err := Transition("bad\x00").validate(); err == nil {
		t.Error("control character in next state accepted")
	}
	if err := Transition("ok").Set("x", 1).Unset("y").validate(); err != nil {
		t.Errorf("valid result refused: %v", err)
	}
	// Results are values: chaining does not modify the original.
	base := Stay().Set("a", 1)
	_ = base.Set("b", 2)
	if len(base.set) != 1 {
		t.Fatal("Set modified the receiver")
	}
}

func TestParseDocClassifiesMalformedDocuments(t *testing.T) {
	types := func(t string) bool { return t == "job" }
	tests := []struct {
		raw     string
		notOurs bool
		invalid string
	}{
		{`{"_id":"a","_rev":"1-x","type":"job","state":"new"}`, false, ""},
		{`{"_id":"a","state":"new"}`, true, ""},
		{`{"_id":"a","type":7,"state":"new"}`, true, ""},
		{`{"_id":"a","type":["job"],"state":"new"}`, true, ""},
		{`{"_id":"a","type":"other","state":"new"}`, true, ""},
		{`{"_id":"_design/x","type":"job","state":"new"}`, true, ""},
		{`[1,2]`, true, ""},
		{`{"_id":"a","type":"job"}`, false, "no state field"},
		{`{"_id":"a","type":"job","state":5}`, false, "state must be a string, got a number"},
		{`{"_id":"a","type":"job","state":["new"]}`, false, "state must be a string, got an array"},
		{`{"_id":"a","type":"job","state":""}`, false, "state is empty"},
		{`{"_id":"a","type":"job","state":"new","docstate":"junk"}`, false, "not valid engine metadata"},
	}
	for _, tt := range tests {
		d, err := parseDoc([]byte(tt.raw), types)
		switch {
		case tt.notOurs:
			if err == nil || !strings.Contains(err.Error(), errNotOurs.Error()) {
				t.Errorf("%s: err %v, want not ours", tt.raw, err)
			}
		case tt.invalid != "":
			inv, ok := err.(*invalidError)
			if !ok || !strings.Contains(inv.reason, tt.invalid) {
				t.Errorf("%s: err %v, want invalid %q", tt.raw, err, tt.invalid)
			}
		default:
			if err != nil || d.State != "new" || d.Rev != "1-x" {
				t.Errorf("%s: %v %+v", tt.raw, err, d)
			}
		}
	}
}
