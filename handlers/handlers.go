package handlers

import (
	"context"
	"errors"
	"fmt"

	"github.com/docstate/docstate/workflow"
)

// Set is a group of handlers registered together, such as device
// registration or channels.
type Set interface {
	// Name identifies the set in logs and errors.
	Name() string
	// Register adds the set's handlers to reg.
	Register(reg *workflow.Registry) error
}

// Provisioner is implemented by sets that must prepare the database before
// the engine starts, such as installing a validation function. Provision
// must be idempotent: every daemon start, and every daemon of a scaled-out
// group, calls it.
type Provisioner interface {
	Provision(ctx context.Context) error
}

// Runner is implemented by sets that follow more than the daemon's own
// database, such as device pairing in its users mode, which follows _users
// and every owner's control database. The daemon runs each beside its
// engine, with the engine's context, waits for it to return, and is ready
// only while every runner is.
type Runner interface {
	Run(ctx context.Context) error
	Ready() error
}

// Repairer is implemented by provisioners that can tell what a run had to
// write. The daemon does not only provision at start: every
// engine.resync_interval it provisions again, so that what went missing or
// was changed (a database deleted and created again, a design document
// edited by hand) is put back; a Repairer's report becomes a log line and a
// metric. Repair must be idempotent and cheap when everything is in place
// (a read, no write).
type Repairer interface {
	Provisioner
	// Repair provisions like Provision and returns one description for
	// each thing it had to write because it was missing or differed;
	// none when everything was in place.
	Repair(ctx context.Context) (repaired []string, err error)
}

// Repair provisions every set again: Repair on Repairers, Provision on the
// other Provisioners (whose repairs cannot be told apart from no-ops). It
// returns what was repaired, by set name, and the first error; the sets
// after a failed one are still provisioned.
func Repair(ctx context.Context, sets ...Set) (map[string][]string, error) {
	repaired := map[string][]string{}
	var first error
	for _, s := range sets {
		var err error
		switch p := s.(type) {
		case Repairer:
			var what []string
			what, err = p.Repair(ctx)
			if len(what) > 0 {
				repaired[s.Name()] = what
			}
		case Provisioner:
			err = p.Provision(ctx)
		}
		if err != nil && first == nil {
			first = fmt.Errorf("handlers: provision set %q: %w", s.Name(), err)
		}
	}
	return repaired, first
}

// Provision calls Provision on every set that implements Provisioner.
func Provision(ctx context.Context, sets ...Set) error {
	for _, s := range sets {
		if p, ok := s.(Provisioner); ok {
			if err := p.Provision(ctx); err != nil {
				return fmt.Errorf("handlers: provision set %q: %w", s.Name(), err)
			}
		}
	}
	return nil
}

// Register adds every set to reg, in order. A set whose registration fails
// (a duplicate (type, state), say) is named in the error; registration stops
// there, because a daemon with half its handlers must not start.
func Register(reg *workflow.Registry, sets ...Set) error {
	if reg == nil {
		return errors.New("handlers: nil registry")
	}
	seen := make(map[string]bool, len(sets))
	for _, s := range sets {
		if s == nil {
			return errors.New("handlers: nil handler set")
		}
		if seen[s.Name()] {
			return fmt.Errorf("handlers: set %q listed twice", s.Name())
		}
		seen[s.Name()] = true
		if err := s.Register(reg); err != nil {
			return fmt.Errorf("handlers: set %q: %w", s.Name(), err)
		}
	}
	return nil
}

// Func adapts a function to Set, for small sets written inline.
type Func struct {
	SetName string
	Fn      func(reg *workflow.Registry) error
}

var _ Set = Func{}

// Name returns SetName.
func (f Func) Name() string { return f.SetName }

// Register calls Fn.
func (f Func) Register(reg *workflow.Registry) error { return f.Fn(reg) }
