package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// Status summarises a database for an operator (docstate status).
type Status struct {
	// Checkpoint is the saved feed position ("" when none is saved) and
	// CheckpointSaved when it was written.
	Checkpoint      string
	CheckpointSaved time.Time
	// Pending counts changes after the checkpoint: work the engine has not
	// finished or not seen.
	Pending int
	// States counts workflow documents per type and state.
	States map[string]map[string]int
	// ClaimsHeld and ClaimsExpired count unsafe claims whose lease is live
	// or ran out.
	ClaimsHeld, ClaimsExpired int
	// Failed counts documents in an error state (docstate.error set);
	// Invalid those with docstate.invalid; RetryWaiting those waiting for a
	// retry after a failure.
	Failed, Invalid, RetryWaiting int
	// Docs counts every document read.
	Docs int
}

// statusPage is how many documents one request of Inspect reads.
const statusPage = 1000

// Inspect reads the checkpoint of engine name and every document of db.
// progress, when set, is called after each page with the documents read so
// far. It reads the whole database: it is an operator's command, not a
// hot path.
func Inspect(ctx context.Context, db *kivik.DB, name string, progress func(docs int)) (Status, error) {
	st := Status{States: map[string]map[string]int{}}
	var cp checkpointDoc
	switch err := db.Get(ctx, checkpointID(name)).ScanDoc(&cp); {
	case err == nil:
		st.Checkpoint, st.CheckpointSaved = cp.Seq, cp.Saved.Time
	case !couch.IsNotFound(err):
		return st, fmt.Errorf("read checkpoint: %w", err)
	}
	since := st.Checkpoint
	if since == "" {
		since = "0"
	}
	pending, err := countChanges(ctx, db, since)
	if err != nil {
		return st, err
	}
	st.Pending = pending

	now := time.Now()
	startKey := ""
	for {
		opts := kivik.Params(map[string]any{"include_docs": true, "limit": statusPage + 1})
		if startKey != "" {
			opts = kivik.Params(map[string]any{"include_docs": true, "limit": statusPage + 1, "start_key": startKey})
		}
		rows := db.AllDocs(ctx, opts)
		n, next := 0, ""
		var iterErr error
		for row, err := range rows.Iterator() {
			if err != nil {
				iterErr = err
				break
			}
			id, _ := row.ID()
			if n == statusPage {
				next = id
				break
			}
			n++
			var doc struct {
				Type  any             `json:"type"`
				State any             `json:"state"`
				Meta  json.RawMessage `json:"docstate"`
			}
			if row.ScanDoc(&doc) != nil {
				continue
			}
			st.Docs++
			typ, ok1 := doc.Type.(string)
			state, ok2 := doc.State.(string)
			if ok1 && ok2 {
				if st.States[typ] == nil {
					st.States[typ] = map[string]int{}
				}
				st.States[typ][state]++
			}
			var m Meta
			if len(doc.Meta) == 0 || json.Unmarshal(doc.Meta, &m) != nil {
				continue
			}
			if m.Error != nil {
				st.Failed++
			}
			if m.Invalid != "" {
				st.Invalid++
			}
			if m.State == state {
				if m.Claim != nil {
					if m.Claim.Expires.After(now) {
						st.ClaimsHeld++
					} else {
						st.ClaimsExpired++
					}
				}
				if m.RetryAt != nil && m.Attempts > 0 {
					st.RetryWaiting++
				}
			}
		}
		_ = rows.Close()
		if iterErr != nil {
			return st, fmt.Errorf("read documents: %w", iterErr)
		}
		if progress != nil {
			progress(st.Docs)
		}
		if next == "" {
			return st, nil
		}
		startKey = next
	}
}

// countChanges counts the changes after since.
func countChanges(ctx context.Context, db *kivik.DB, since string) (int, error) {
	n := 0
	err := eachChange(ctx, db, since, func(string) { n++ })
	return n, err
}

// ChangedSince lists, once each and in feed order, the ids of documents
// changed after since (deleted ones left out): what replay --since acts on.
func ChangedSince(ctx context.Context, db *kivik.DB, since string) ([]string, error) {
	var ids []string
	seen := map[string]bool{}
	err := eachChange(ctx, db, since, func(id string) {
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	})
	return ids, err
}

// eachChange calls fn with the id of every non-deleted change after since.
func eachChange(ctx context.Context, db *kivik.DB, since string, fn func(id string)) error {
	rows := db.Changes(ctx, kivik.Param("since", since))
	defer rows.Close()
	for ch, err := range rows.Iterator() {
		if err != nil {
			return fmt.Errorf("changes since %s: %w", since, err)
		}
		if !ch.Deleted {
			fn(ch.ID)
		}
	}
	return nil
}

// Touched is one document Retry or Replay acted on (or would, in a dry run).
type Touched struct {
	ID, Type string
	// From is the state the document was in, To the state it is put in
	// (the same for a replay).
	From, To string
	// Handler says what will run: "safe", "unsafe", or "none" when no
	// handler is registered for To.
	Handler string
}

// Retry moves documents in an error state back to the state they failed in
// (docstate.error.from), with fresh bookkeeping, so the engine handles them
// again from the first attempt. ids selects documents; with no ids every
// document of type typ in state errorState is selected. With dryRun nothing
// is written. Documents not in an error state are skipped. For an unsafe
// handler whose claim expired (FailExpired), a retry runs the handler again:
// that is the operator's decision to make.
func Retry(ctx context.Context, db *kivik.DB, reg *Registry, ids []string, typ, errorState string, dryRun bool) ([]Touched, error) {
	return rewrite(ctx, db, reg, ids, typ, errorState, dryRun, func(doc *Doc) (string, *Meta, bool) {
		if doc.meta.Error == nil || doc.meta.Error.From == "" {
			return "", nil, false
		}
		return doc.meta.Error.From, &Meta{From: doc.State}, true
	})
}

// Replay makes the engine handle documents again in their current state:
// it clears the settled mark, pending backoff and wake-ups, and writes the
// document, which a running engine sees as a change. Claims are kept (a
// live claim still belongs to its owner). ids selects documents; with no
// ids every document of type typ in state state is selected.
func Replay(ctx context.Context, db *kivik.DB, reg *Registry, ids []string, typ, state string, dryRun bool) ([]Touched, error) {
	return rewrite(ctx, db, reg, ids, typ, state, dryRun, func(doc *Doc) (string, *Meta, bool) {
		m := doc.meta.forState(doc.State)
		m.Settled, m.RetryAt, m.WakeAt, m.Attempts, m.LastError = 0, nil, nil, 0, ""
		return doc.State, &m, true
	})
}

// rewrite applies change to each selected document with compare-and-swap,
// re-reading on conflicts.
func rewrite(ctx context.Context, db *kivik.DB, reg *Registry, ids []string, typ, state string, dryRun bool,
	change func(doc *Doc) (to string, meta *Meta, ok bool)) ([]Touched, error) {
	if len(ids) == 0 {
		if typ == "" || state == "" {
			return nil, errors.New("give document ids, or a type and a state")
		}
		var err error
		if ids, err = findIDs(ctx, db, map[string]any{"type": typ, "state": state}); err != nil {
			return nil, err
		}
	}
	var out []Touched
	for _, id := range ids {
		for attempt := 0; ; attempt++ {
			raw, err := readRaw(ctx, db, id)
			if err != nil {
				return out, fmt.Errorf("read %s: %w", id, err)
			}
			// Operators act on documents whatever handlers this binary has.
			var peek struct {
				Type string `json:"type"`
			}
			_ = json.Unmarshal(raw, &peek)
			doc, err := parseDoc(raw, func(t string) bool { return t == peek.Type })
			if err != nil {
				return out, fmt.Errorf("%s: %w", id, err)
			}
			to, meta, ok := change(doc)
			if !ok {
				break
			}
			t := Touched{ID: id, Type: doc.Type, From: doc.State, To: to, Handler: "none"}
			if s, found := reg.Lookup(doc.Type, to); found {
				t.Handler = s.Mode.String()
			}
			if dryRun {
				out = append(out, t)
				break
			}
			meta.Updated = stamp(time.Now())
			meta.State = to
			meta.setDue()
			body, err := build(doc.fields, to, nil, nil, meta)
			if err != nil {
				return out, err
			}
			_, err = db.Put(ctx, id, body)
			if couch.IsConflict(err) && attempt < maxRounds {
				continue
			}
			if err != nil {
				return out, fmt.Errorf("write %s: %w", id, err)
			}
			out = append(out, t)
			break
		}
	}
	return out, nil
}

// findIDs lists the ids matching selector.
func findIDs(ctx context.Context, db *kivik.DB, selector map[string]any) ([]string, error) {
	var ids []string
	_, err := forEachID(ctx, db, selector, func(id string) { ids = append(ids, id) })
	return ids, err
}
