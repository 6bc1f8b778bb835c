package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

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
func Retry(ctx context.Context, db *kivik.DB, reg *workflow.Registry, sel Selection) (Report, error) {
	return rewrite(ctx, db, reg, sel, func(doc *workflow.Doc) (string, *workflow.Meta, bool) {
		failed := doc.Meta().Error
		if failed == nil || failed.From == "" {
			return "", nil, false
		}
		return failed.From, &workflow.Meta{From: doc.State}, true
	})
}

// Replay makes the engine handle documents again in their current state:
// it clears the settled mark, pending backoff and wake-ups, and writes the
// document, which a running engine sees as a change. Claims are kept (a
// live claim still belongs to its owner). Errors are as for Retry.
func Replay(ctx context.Context, db *kivik.DB, reg *workflow.Registry, sel Selection) (Report, error) {
	return rewrite(ctx, db, reg, sel, func(doc *workflow.Doc) (string, *workflow.Meta, bool) {
		m := doc.Meta().ForState(doc.State)
		m.Settled, m.RetryAt, m.WakeAt, m.Attempts, m.LastError = 0, nil, nil, 0, ""
		return doc.State, &m, true
	})
}

// rewrite applies change to each selected document with compare-and-swap,
// re-reading on conflicts. One document's failure does not stop the rest:
// an operator re-driving a thousand documents must not be left with an
// unknown prefix of them written.
func rewrite(ctx context.Context, db *kivik.DB, reg *workflow.Registry, sel Selection,
	change func(doc *workflow.Doc) (to string, meta *workflow.Meta, ok bool)) (Report, error) {
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
func rewriteOne(ctx context.Context, db *kivik.DB, reg *workflow.Registry, id string, dryRun bool,
	change func(doc *workflow.Doc) (to string, meta *workflow.Meta, ok bool)) (Touched, skipReason, error) {
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
		// The same tests as the engine's, made first so that what the
		// daemon would skip is counted, not reported as failed.
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
		// The type is registered (above), so NewDoc refuses what the
		// engine would refuse.
		doc, err := workflow.NewDoc(raw)
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
		meta.Updated = &workflow.Stamp{Time: time.Now().UTC().Truncate(time.Millisecond)}
		meta.State = to
		setDue(meta)
		body, err := withMeta(raw, to, meta)
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
	_, err := couch.FindEach(ctx, db, selector, []string{"_id"}, func(doc json.RawMessage) error {
		var d struct {
			ID string `json:"_id"`
		}
		if json.Unmarshal(doc, &d) == nil && d.ID != "" {
			ids = append(ids, d.ID)
		}
		return nil
	})
	return ids, err
}

// maxRounds bounds the re-reads of one document whose write lost a race.
const maxRounds = 5

// readRaw returns a document's JSON as the server sent it, with its
// conflicts listed, as the engine reads it.
func readRaw(ctx context.Context, db *kivik.DB, id string) ([]byte, error) {
	var raw json.RawMessage
	if err := db.Get(ctx, id, kivik.Param("conflicts", true)).ScanDoc(&raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// withMeta returns the body to write back: the document's fields as read
// (everything the application and CouchDB put there, attachment stubs
// included) without the conflicts list, which is not part of the
// document, and with state and the engine's bookkeeping replaced.
func withMeta(raw []byte, state string, meta *workflow.Meta) (map[string]json.RawMessage, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, fmt.Errorf("body is not a JSON object: %w", err)
	}
	delete(fields, "_conflicts")
	var err error
	if fields["state"], err = json.Marshal(state); err != nil {
		return nil, err
	}
	if fields[metaField], err = json.Marshal(meta); err != nil {
		return nil, err
	}
	return fields, nil
}

// metaField is the field holding the engine's bookkeeping (workflow.Meta).
const metaField = "docstate"

// setDue sets Due as the engine keeps it: the earliest of the retry time,
// the wake-up and the claim's expiry, so the engine's due scan finds the
// document when one of them comes.
func setDue(m *workflow.Meta) {
	var due time.Time
	for _, t := range []*workflow.Stamp{m.RetryAt, m.WakeAt, claimExpiry(m.Claim)} {
		if t != nil && !t.IsZero() && (due.IsZero() || t.Before(due)) {
			due = t.Time
		}
	}
	m.Due = nil
	if !due.IsZero() {
		m.Due = &workflow.Stamp{Time: due.UTC().Truncate(time.Millisecond)}
	}
}

func claimExpiry(c *workflow.Claim) *workflow.Stamp {
	if c == nil {
		return nil
	}
	return &c.Expires
}

func unmarshalString(raw json.RawMessage, s *string) error {
	if len(raw) == 0 || raw[0] != '"' {
		return errors.New("not a string")
	}
	return json.Unmarshal(raw, s)
}
