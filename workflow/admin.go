package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/localdoc"
)

// Status summarises a database for an operator (docstate status).
//
// The JSON keys are part of the command line's interface (status -o json):
// lower-case and stable; add keys, never rename them.
type Status struct {
	// Checkpoint is the saved feed position ("" when none is saved) and
	// CheckpointSaved when it was written (absent when never).
	Checkpoint      string    `json:"checkpoint"`
	CheckpointSaved time.Time `json:"checkpoint_saved,omitzero"`
	// Pending counts changes after the checkpoint: work the engine has not
	// finished or not seen.
	Pending int `json:"pending"`
	// States counts workflow documents per type and state.
	States map[string]map[string]int `json:"states"`
	// ClaimsHeld and ClaimsExpired count unsafe claims whose lease is live
	// or ran out.
	ClaimsHeld    int `json:"claims_held"`
	ClaimsExpired int `json:"claims_expired"`
	// Failed counts documents in an error state (docstate.error set);
	// Invalid those with docstate.invalid; RetryWaiting those waiting for a
	// retry after a failure.
	Failed       int `json:"failed"`
	Invalid      int `json:"invalid"`
	RetryWaiting int `json:"retry_waiting"`
	// Docs counts every document read.
	Docs int `json:"docs"`
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
	switch err := db.Get(ctx, localdoc.CheckpointID(name)).ScanDoc(&cp); {
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
// Its JSON keys are part of the command line's interface.
type Touched struct {
	ID   string `json:"id"`
	Type string `json:"type"`
	// From is the state the document was in, To the state it is put in
	// (the same for a replay).
	From string `json:"from"`
	To   string `json:"to"`
	// Handler says what will run: "safe", "unsafe", or "none" when no
	// handler is registered for To.
	Handler string `json:"handler"`
}

// Selection says which documents Retry and Replay act on, and how.
type Selection struct {
	// IDs selects documents by id; when empty, every document of Type in
	// State is selected.
	IDs         []string
	Type, State string
	// DryRun writes nothing; the report says what would be done.
	DryRun bool
	// Progress, when set, is called after each document with how many
	// were looked at and how many were selected.
	Progress func(done, total int)
}

// Skipped counts the selected documents Retry and Replay left alone, by
// reason. None of them is an error: a selection by feed position (replay
// --since) meets design documents and documents of other applications as a
// matter of course.
type Skipped struct {
	// Design and Local count _design/ and _local/ documents: never
	// workflow documents.
	Design int `json:"design"`
	Local  int `json:"local"`
	// Missing counts documents that are gone (deleted since selected, or
	// an id that never existed).
	Missing int `json:"missing"`
	// Unregistered counts documents without a string type, or of a type
	// this binary has no handlers for: the daemon would not touch them.
	Unregistered int `json:"unregistered"`
	// NoState counts documents of a handled type without a non-empty
	// string state (the daemon records them invalid instead).
	NoState int `json:"no_state"`
	// NotFailed counts documents a retry found not in an error state.
	NotFailed int `json:"not_failed"`
}

// Total is the number of skipped documents.
func (s Skipped) Total() int {
	return s.Design + s.Local + s.Missing + s.Unregistered + s.NoState + s.NotFailed
}

// DocError is a document Retry or Replay could not act on.
type DocError struct {
	ID    string `json:"id"`
	Error string `json:"error"`
}

// Report is what Retry and Replay did: the documents written (or that would
// be, in a dry run), those skipped and those that failed. Its JSON keys are
// part of the command line's interface.
type Report struct {
	DryRun  bool       `json:"dry_run"`
	Touched []Touched  `json:"documents"`
	Skipped Skipped    `json:"skipped"`
	Errors  []DocError `json:"errors"`
}

// Retry moves documents in an error state back to the state they failed in
// (docstate.error.from), with fresh bookkeeping, so the engine handles them
// again from the first attempt. Documents not in an error state are
// skipped. For an unsafe handler whose claim expired (FailExpired), a retry
// runs the handler again: that is the operator's decision to make.
//
// A document that cannot be read, parsed or written is recorded in the
// report's Errors and the others are still done; the error returned is for
// the selection as a whole (no selection, the query failed, ctx ended).
func Retry(ctx context.Context, db *kivik.DB, reg *Registry, sel Selection) (Report, error) {
	return rewrite(ctx, db, reg, sel, func(doc *Doc) (string, *Meta, bool) {
		if doc.meta.Error == nil || doc.meta.Error.From == "" {
			return "", nil, false
		}
		return doc.meta.Error.From, &Meta{From: doc.State}, true
	})
}

// Replay makes the engine handle documents again in their current state:
// it clears the settled mark, pending backoff and wake-ups, and writes the
// document, which a running engine sees as a change. Claims are kept (a
// live claim still belongs to its owner). Errors are as for Retry.
func Replay(ctx context.Context, db *kivik.DB, reg *Registry, sel Selection) (Report, error) {
	return rewrite(ctx, db, reg, sel, func(doc *Doc) (string, *Meta, bool) {
		m := doc.meta.forState(doc.State)
		m.Settled, m.RetryAt, m.WakeAt, m.Attempts, m.LastError = 0, nil, nil, 0, ""
		return doc.State, &m, true
	})
}

// rewrite applies change to each selected document with compare-and-swap,
// re-reading on conflicts. One document's failure does not stop the rest:
// an operator re-driving a thousand documents must not be left with an
// unknown prefix of them written.
func rewrite(ctx context.Context, db *kivik.DB, reg *Registry, sel Selection,
	change func(doc *Doc) (to string, meta *Meta, ok bool)) (Report, error) {
	rep := Report{DryRun: sel.DryRun, Touched: []Touched{}, Errors: []DocError{}}
	ids := sel.IDs
	if len(ids) == 0 {
		if sel.Type == "" || sel.State == "" {
			return rep, errors.New("give document ids, or a type and a state")
		}
		var err error
		if ids, err = findIDs(ctx, db, map[string]any{"type": sel.Type, "state": sel.State}); err != nil {
			return rep, err
		}
	}
	for i, id := range ids {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		t, skip, err := rewriteOne(ctx, db, reg, id, sel.DryRun, change)
		switch {
		case err != nil && ctx.Err() != nil:
			// Cancelled: the document was not failed by its own fault.
			return rep, ctx.Err()
		case err != nil:
			rep.Errors = append(rep.Errors, DocError{ID: id, Error: err.Error()})
		case skip != notSkipped:
			rep.Skipped.add(skip)
		default:
			rep.Touched = append(rep.Touched, t)
		}
		if sel.Progress != nil {
			sel.Progress(i+1, len(ids))
		}
	}
	return rep, nil
}

// skipReason is why rewriteOne left a document alone (notSkipped: it did
// not).
type skipReason int

const (
	notSkipped skipReason = iota
	skipDesign
	skipLocal
	skipMissing
	skipUnregistered
	skipNoState
	skipNotFailed
)

// add counts one document skipped for r.
func (s *Skipped) add(r skipReason) {
	switch r {
	case skipDesign:
		s.Design++
	case skipLocal:
		s.Local++
	case skipMissing:
		s.Missing++
	case skipUnregistered:
		s.Unregistered++
	case skipNoState:
		s.NoState++
	case skipNotFailed:
		s.NotFailed++
	}
}

// rewriteOne applies change to one document: what was done, or why it was
// skipped, or why it failed.
func rewriteOne(ctx context.Context, db *kivik.DB, reg *Registry, id string, dryRun bool,
	change func(doc *Doc) (to string, meta *Meta, ok bool)) (Touched, skipReason, error) {
	switch {
	case strings.HasPrefix(id, "_design/"):
		return Touched{}, skipDesign, nil
	case strings.HasPrefix(id, "_local/"):
		return Touched{}, skipLocal, nil
	}
	for attempt := 0; ; attempt++ {
		raw, err := readRaw(ctx, db, id)
		if couch.IsNotFound(err) {
			return Touched{}, skipMissing, nil
		}
		if err != nil {
			return Touched{}, notSkipped, fmt.Errorf("read: %w", err)
		}
		// The same tests as the engine's (parseDoc), made first so that
		// what the daemon would skip is counted, not reported as failed.
		var peek struct {
			Type  json.RawMessage `json:"type"`
			State json.RawMessage `json:"state"`
		}
		if err := json.Unmarshal(raw, &peek); err != nil {
			return Touched{}, notSkipped, fmt.Errorf("body is not a JSON object: %w", err)
		}
		var typ, state string
		if unmarshalString(peek.Type, &typ) != nil || !reg.HasType(typ) {
			return Touched{}, skipUnregistered, nil
		}
		if unmarshalString(peek.State, &state) != nil || state == "" {
			return Touched{}, skipNoState, nil
		}
		doc, err := parseDoc(raw, reg.HasType)
		if err != nil {
			return Touched{}, notSkipped, err
		}
		to, meta, ok := change(doc)
		if !ok {
			return Touched{}, skipNotFailed, nil
		}
		t := Touched{ID: id, Type: doc.Type, From: doc.State, To: to, Handler: "none"}
		if s, found := reg.Lookup(doc.Type, to); found {
			t.Handler = s.Mode.String()
		}
		if dryRun {
			return t, notSkipped, nil
		}
		meta.Updated = stamp(time.Now())
		meta.State = to
		meta.setDue()
		body, err := build(doc.fields, to, nil, nil, meta)
		if err != nil {
			return Touched{}, notSkipped, err
		}
		_, err = db.Put(ctx, id, body)
		if couch.IsConflict(err) && attempt < maxRounds {
			continue
		}
		if err != nil {
			return Touched{}, notSkipped, fmt.Errorf("write: %w", err)
		}
		return t, notSkipped, nil
	}
}

// findIDs lists the ids matching selector.
func findIDs(ctx context.Context, db *kivik.DB, selector map[string]any) ([]string, error) {
	var ids []string
	_, err := forEachID(ctx, db, selector, func(id string) { ids = append(ids, id) })
	return ids, err
}
