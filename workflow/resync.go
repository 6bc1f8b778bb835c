package workflow

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/docstate/docstate/internal/couch"
	kivik "github.com/go-kivik/kivik/v4"
)

// resyncLoop makes the engine independent of any single feed event: at
// start it queues every document in a registered (type, state), and then
// every ResyncInterval every document whose due time passed (an expired
// claim, a due retry, a wake-up), which covers work recorded by engines that
// have since died.
func (e *Engine) resyncLoop(ctx context.Context) {
	if !e.opts.NoStartScan {
		var n int
		err := e.retry(ctx, "start scan failed", func() (err error) {
			n, err = e.scanHandled(ctx)
			return err
		})
		if err != nil {
			return
		}
		e.log.Info("start scan done", "queued", n)
	} else {
		// Without the full scan, documents whose due time passed while no
		// engine ran (a retry, a wake-up, a dead engine's claim) are still
		// queued at once, not a ResyncInterval later: a supervisor starts
		// an engine exactly when they are due.
		err := e.retry(ctx, "due scan at start failed", func() error {
			_, err := e.scanDue(ctx)
			return err
		})
		if err != nil {
			return
		}
	}
	e.startScanned.Store(true)
	tick := time.NewTicker(e.opts.ResyncInterval)
	defer tick.Stop()
	var rebalanced <-chan struct{}
	if e.members != nil {
		rebalanced = e.members.changed
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-rebalanced:
			// The live members changed: documents that were another's
			// (one that left, or whose share moved) may be ours now.
			var n int
			err := e.retry(ctx, "rescan after a membership change failed", func() (err error) {
				n, err = e.scanHandled(ctx)
				return err
			})
			if err != nil {
				return
			}
			e.log.Debug("rescan after a membership change", "queued", n)
			continue
		case <-tick.C:
		}
		if n, err := e.scanDue(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("resync scan failed", "err", err)
		} else if n > 0 {
			e.log.Debug("resync scan queued due documents", "queued", n)
		}
	}
}

// scanHandled queues every document in a registered (type, state).
func (e *Engine) scanHandled(ctx context.Context) (int, error) {
	total := 0
	for k := range e.specs {
		n, err := e.find(ctx, map[string]any{"type": k.typ, "state": k.state})
		total += n
		if err != nil {
			return total, fmt.Errorf("scan %s/%s: %w", k.typ, k.state, err)
		}
	}
	return total, nil
}

// scanDue queues every document whose due time passed.
func (e *Engine) scanDue(ctx context.Context) (int, error) {
	now := time.Now().UTC().Format(timeLayout)
	return e.find(ctx, map[string]any{metaField + ".due": map[string]any{"$lte": now}})
}

// find queues the ids matching selector.
func (e *Engine) find(ctx context.Context, selector map[string]any) (int, error) {
	n, err := forEachID(ctx, e.db, selector, func(id string) { e.q.add(id, nil, 0) })
	e.stats.resyncQueued.Add(int64(n))
	return n, err
}

// forEachID calls fn with every id matching selector.
func forEachID(ctx context.Context, db *kivik.DB, selector map[string]any, fn func(id string)) (int, error) {
	return couch.FindEach(ctx, db, selector, []string{"_id"}, func(doc json.RawMessage) error {
		var d struct {
			ID string `json:"_id"`
		}
		if json.Unmarshal(doc, &d) == nil && d.ID != "" {
			fn(d.ID)
		}
		return nil
	})
}
