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
	sel := map[string]any{metaField + ".due": map[string]any{"$lte": now}}
	if e.dueIndexed(ctx) {
		n, err := e.queued(couch.FindEachSorted(ctx, e.db, sel, metaField+".due", dueIndexDDoc, dueIndexName, func(id string) error {
			e.q.add(id, nil, 0)
			return nil
		}))
		if err == nil || ctx.Err() != nil {
			return n, err
		}
		// The index was removed meanwhile, or the server cannot sort by
		// it: this scan reads the database whole, the next one looks at
		// the index again.
		e.log.Warn("due scan by index failed; scanning the whole database", "err", err)
		e.dueIndex.Store(nil)
	}
	return e.find(ctx, sel)
}

// The due scan of a large database goes through a json index on the due
// time, so it costs the documents that are due rather than the whole
// database, every ResyncInterval and in every engine on it. Small databases
// (a user's control database) get no index: their whole scan is cheap, and
// an index is a design document that replicates to whoever reads the
// database.
const (
	dueIndexDDoc = "docstate-due"
	dueIndexName = "due"
	// dueIndexMinDocs is the size from which a database gets the index.
	dueIndexMinDocs = 1000
	// dueIndexRecheck is how often a database without the index is looked
	// at again (it may have grown, or the index may be creatable now).
	dueIndexRecheck = 10 * time.Minute
)

// dueIndexState is what the engine knows of the due index.
type dueIndexState struct {
	ok      bool
	checked time.Time
}

// dueIndexed reports whether the due scan can use the index, creating it
// when the database is large enough. A server that refuses (no Mango
// indexes, no admin rights) leaves the whole scan, as before.
func (e *Engine) dueIndexed(ctx context.Context) bool {
	if st := e.dueIndex.Load(); st != nil && (st.ok || time.Since(st.checked) < dueIndexRecheck) {
		return st.ok
	}
	ok, err := e.ensureDueIndex(ctx)
	if err != nil && ctx.Err() == nil {
		e.log.Info("due scans read the whole database: no index on the due time", "err", err)
	}
	e.dueIndex.Store(&dueIndexState{ok: ok, checked: time.Now()})
	return ok
}

func (e *Engine) ensureDueIndex(ctx context.Context) (bool, error) {
	info, err := e.db.Stats(ctx)
	if err != nil {
		return false, fmt.Errorf("database info: %w", err)
	}
	if info.DocCount < dueIndexMinDocs {
		return false, nil
	}
	// Idempotent: the server answers "exists" for the same definition.
	if err := e.db.CreateIndex(ctx, dueIndexDDoc, dueIndexName, map[string]any{"fields": []string{metaField + ".due"}}); err != nil {
		return false, fmt.Errorf("create index %s/%s: %w", dueIndexDDoc, dueIndexName, err)
	}
	e.log.Info("due scans use an index on the due time", "ddoc", "_design/"+dueIndexDDoc, "docs", info.DocCount)
	return true, nil
}

// find queues the ids matching selector.
func (e *Engine) find(ctx context.Context, selector map[string]any) (int, error) {
	return e.queued(forEachID(ctx, e.db, selector, func(id string) { e.q.add(id, nil, 0) }))
}

// queued counts the ids a scan queued, and passes its answer on.
func (e *Engine) queued(n int, err error) (int, error) {
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
