// Package supervised is the narrow connection between an engine and the
// many-database supervisor that runs it (package workflow/supervisor).
//
// The supervisor starts each engine with workflow.New and runs it with
// Engine.Run like anyone else; what only it needs travels in Run's context
// as a *Hooks (With, From), so workflow's exported API carries nothing for
// it. The engine reads the hooks once as Run starts and fills in what it
// left as Run returns.
package supervised

import (
	"context"
	"sync"

	"github.com/docstate/docstate/workflow/internal/budget"
)

// Hooks are what one supervised engine run shares with its supervisor.
type Hooks struct {
	// Budget replaces the engine's own byte budget: all of a supervisor's
	// engines share one, so a burst of large documents across many
	// databases is bounded once, not per database.
	Budget *budget.Budget
	// Own records the revisions the engine writes (see OwnWrites).
	Own *OwnWrites

	// StartScanned and SavedSeq are set by the engine as Run returns:
	// whether its start scan queued its documents, and the checkpoint it
	// last saved ("" when none). The supervisor reads them once it has
	// seen Run return.
	StartScanned bool
	SavedSeq     string
}

type hooksKey struct{}

// With returns ctx carrying h, for Engine.Run.
func With(ctx context.Context, h *Hooks) context.Context {
	return context.WithValue(ctx, hooksKey{}, h)
}

// From returns the hooks ctx carries, nil when the engine is not
// supervised.
func From(ctx context.Context) *Hooks {
	h, _ := ctx.Value(hooksKey{}).(*Hooks)
	return h
}

// OwnWrites remembers the revisions an engine wrote, so that a supervisor
// can tell a stopped engine's own late feed rows from someone else's
// change. It is bounded: when full it starts over, which only makes the
// supervisor start an engine that finds nothing to do. Only a supervisor's
// engines keep one; a nil *OwnWrites remembers nothing.
type OwnWrites struct {
	mu   sync.Mutex
	revs map[string]string // id → last revision written
}

// MaxOwnWrites bounds the revisions an OwnWrites remembers.
const MaxOwnWrites = 10000

// Add records that the engine wrote rev of id.
func (o *OwnWrites) Add(id, rev string) {
	if o == nil {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.revs == nil || len(o.revs) >= MaxOwnWrites {
		o.revs = make(map[string]string)
	}
	o.revs[id] = rev
}

// Wrote reports whether rev of id is the last revision the engine wrote.
func (o *OwnWrites) Wrote(id, rev string) bool {
	if o == nil {
		return false
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return rev != "" && o.revs[id] == rev
}
