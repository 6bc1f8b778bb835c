package supervisor

import (
	"context"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/internal/localdoc"
	"github.com/docstate/docstate/workflow/internal/supervised"
)

// settle records what a stopped engine left; see onExit.
func (s *Supervisor) settle(ctx context.Context, name string, w *watchedDB, r *runningDB) {
	due := r.nextDue
	// Caught up: remember the update_seq now, so only a change after this
	// starts it again. A yielded engine still has work: queue it again.
	var seq string
	if st, err := s.client.DB(name).Stats(ctx); err == nil && !r.yield {
		seq = st.UpdateSeq
	}
	s.saveDue(ctx, name, w, due)
	// A change written after the engine's last look and before the
	// update_seq above was read would hide behind it: the changes after
	// the engine's final checkpoint show it (read after the update_seq,
	// so whatever comes later moves the update_seq instead).
	if seq != "" {
		cp := r.hooks.SavedSeq
		if others, err := s.othersChanges(ctx, s.client.DB(name), cp, r.hooks.Own); cp == "" || err != nil || others {
			seq = ""
		}
	}
	s.mu.Lock()
	w.seen, w.due, w.settling = seq, due, false
	recheck := w.recheck
	w.recheck = false
	s.mu.Unlock()
	if r.yield || seq == "" {
		s.enqueue(name)
	} else if recheck {
		s.markDirty(name)
	}
}

// saveDue stores (or clears) the earliest due time of a database whose
// engine stopped, so that a restarted daemon starts its engine in time.
func (s *Supervisor) saveDue(ctx context.Context, name string, w *watchedDB, due time.Time) {
	due = due.UTC().Truncate(time.Millisecond)
	s.mu.Lock()
	same := w.storedKnown && w.stored.Equal(due)
	s.mu.Unlock()
	if same {
		return // most stops: no timer before, none now
	}
	db := s.client.DB(name)
	id := localdoc.DueID(s.opts.Engine.Name)
	var cur struct {
		Rev string          `json:"_rev"`
		Due *workflow.Stamp `json:"due"`
	}
	err := db.Get(ctx, id).ScanDoc(&cur)
	if err != nil && !couch.IsNotFound(err) {
		return
	}
	if !stampTime(cur.Due).Equal(due) || (cur.Rev == "" && !due.IsZero()) {
		doc := map[string]any{"due": toStamp(due)}
		if cur.Rev != "" {
			doc["_rev"] = cur.Rev
		}
		if _, err := db.Put(ctx, id, doc); err != nil {
			s.log.Debug("due time not saved", "db", name, "err", err)
			return
		}
	}
	s.mu.Lock()
	w.stored, w.storedKnown = due, true
	s.mu.Unlock()
}

// othersChanges reports whether a change follows seq in db that the engine
// whose writes own recorded (nil: no engine) did not write itself. An engine stops as soon as its work is
// done, often before the feed brought back its last writes; those rows are
// after its checkpoint but are no work, and starting an engine for them
// would only find that out. More than a page of rows counts as work.
func (s *Supervisor) othersChanges(ctx context.Context, db *kivik.DB, seq string, own *supervised.OwnWrites) (bool, error) {
	const page = 100
	rows := db.Changes(ctx, kivik.Params(map[string]any{"since": seq, "limit": page}))
	defer rows.Close()
	n := 0
	for ch, err := range rows.Iterator() {
		if err != nil {
			return false, err
		}
		n++
		if own == nil || len(ch.Changes) == 0 || !own.Wrote(ch.ID, ch.Changes[0]) {
			return true, nil
		}
	}
	return n >= page, nil
}

// firstLook decides whether a database seen for the first time needs an
// engine: not when no change follows its checkpoint (the checkpoint only
// passes finished work) and its stored due time, returned, has not come.
func (s *Supervisor) firstLook(ctx context.Context, name string) (idle bool, due time.Time) {
	db := s.client.DB(name)
	var cp struct {
		Seq string `json:"seq"`
	}
	if err := db.Get(ctx, localdoc.CheckpointID(s.opts.Engine.Name)).ScanDoc(&cp); err != nil || cp.Seq == "" {
		return false, time.Time{}
	}
	if more, err := s.othersChanges(ctx, db, cp.Seq, nil); err != nil || more {
		return false, time.Time{}
	}
	var stored struct {
		Due *workflow.Stamp `json:"due"`
	}
	if err := db.Get(ctx, localdoc.DueID(s.opts.Engine.Name)).ScanDoc(&stored); err != nil && !couch.IsNotFound(err) {
		return false, time.Time{}
	}
	return true, stampTime(stored.Due)
}

// toStamp is t as stored in a due document: nil for none.
func toStamp(t time.Time) *workflow.Stamp {
	if t.IsZero() {
		return nil
	}
	return &workflow.Stamp{Time: t.UTC().Truncate(time.Millisecond)}
}

// stampTime is the time a stored stamp holds, zero for none.
func stampTime(s *workflow.Stamp) time.Time {
	if s == nil {
		return time.Time{}
	}
	return s.Time
}
