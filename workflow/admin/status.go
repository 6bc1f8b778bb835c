package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
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
	var cp struct {
		Seq   string         `json:"seq"`
		Saved workflow.Stamp `json:"saved"`
	}
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
			var m workflow.Meta
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
