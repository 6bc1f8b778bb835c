package workflow

// Conflicted documents: rule 5 of prove.go. A conflicted workflow document
// is resolved by whichever engine reads it, once no branch holds a live
// claim: one branch is kept (survivor), its bookkeeping merged from the
// others (mergeMeta), and the others become tombstones.

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// resolve removes a conflicted workflow document's losing branches (rule 5
// in prove.go). It runs before anything else is done with the document.
func (e *Engine) resolve(ctx context.Context, doc *Doc, fromHint bool) outcome {
	if fromHint {
		return conflicted // the feed's body may be older: read the server's
	}
	// The GET that showed the conflict may show only some branches (one
	// replica's view on a cluster); removing branches needs all of them.
	leaves, err := e.leaves(ctx, doc.ID)
	if err != nil {
		e.log.Debug("cannot read conflicting revisions", "id", doc.ID, "err", err)
		e.hidden.Store(doc.ID, true)
		return transient
	}
	if len(leaves) == 1 {
		return conflicted // resolved meanwhile, or no other branch: read it
	}
	now := time.Now()
	var live time.Time
	for _, l := range leaves {
		if c := liveClaim(l, now); !c.IsZero() && c.After(live) {
			live = c
		}
	}
	if !live.IsZero() {
		// A run or a proof may be under way on some branch: removing any
		// branch now could hide it from a proof (rule 3). Its result or
		// yield brings the document back; the lease is the fallback.
		e.stats.conflictsWaiting.Add(1)
		e.hidden.Store(doc.ID, true)
		e.log.Debug("conflicted document has a live claim on a branch; resolving later", "id", doc.ID, "until", live)
		return finishedAfter(live.Sub(now) + time.Second)
	}
	keep := survivor(leaves)
	merged, changed := mergeMeta(leaves, keep)
	set := e.maxFields(leaves, keep)
	if changed || len(set) > 0 {
		sdoc := leaves[keep].doc
		sdoc.db = e.db
		if _, _, err := e.commit(ctx, sdoc, "", set, nil, merged); err != nil {
			return e.settle(err, &e.stats.conflicts, func() outcome { return transient }, func(error) outcome { return transient })
		}
	}
	var tombs []any
	for i, l := range leaves {
		if i != keep {
			tombs = append(tombs, map[string]any{"_id": doc.ID, "_rev": l.rev, "_deleted": true})
		}
	}
	results, err := e.db.BulkDocs(ctx, tombs)
	if err != nil {
		return transient
	}
	removed := 0
	for _, r := range results {
		if r.Error == nil {
			removed++
		}
	}
	e.stats.conflictsResolved.Add(int64(removed))
	e.log.Info("conflicted document resolved", "id", doc.ID, "type", doc.Type, "kept", leaves[keep].rev, "removed", removed)
	return conflicted // read the resolved document and go on from it
}

// liveClaim returns the expiry of a live, unyielded claim on a branch, or
// the zero time.
func liveClaim(l leaf, now time.Time) time.Time {
	if l.doc == nil {
		return time.Time{}
	}
	m := l.doc.meta.ForState(l.doc.State)
	if m.Claim == nil || m.Yielded || !m.Claim.Expires.After(now) {
		return time.Time{}
	}
	return m.Claim.Expires.Time
}

// survivor picks the branch to keep: not yielded, then without a claim,
// then CouchDB's winner order.
func survivor(leaves []leaf) int {
	rank := func(l leaf) int {
		if l.doc == nil {
			return 1
		}
		m := l.doc.meta.ForState(l.doc.State)
		switch {
		case m.Yielded:
			return 0
		case m.Claim != nil:
			return 1
		default:
			return 2
		}
	}
	best := 0
	for i := 1; i < len(leaves); i++ {
		a, b := leaves[i], leaves[best]
		if ra, rb := rank(a), rank(b); ra > rb || (ra == rb && couchWins(a.rev, b.rev)) {
			best = i
		}
	}
	return best
}

// couchWins reports whether revision a beats b in CouchDB's choice of the
// winning revision among live leaves: higher generation, then the higher
// revision id.
func couchWins(a, b string) bool {
	ga, gb := revGeneration(a), revGeneration(b)
	if ga != gb {
		return ga > gb
	}
	_, ha, _ := strings.Cut(a, "-")
	_, hb, _ := strings.Cut(b, "-")
	return ha > hb
}

// mergeMeta returns the kept branch's bookkeeping with what the other
// branches in the same state know that it does not, and whether it differs
// from what the branch holds.
func mergeMeta(leaves []leaf, keep int) (Meta, bool) {
	k := leaves[keep].doc
	if k == nil {
		return Meta{}, false
	}
	m := k.meta.ForState(k.State)
	changed := m.Yielded
	m.Yielded = false
	seen := m.Claims
	for i, l := range leaves {
		if i == keep || l.doc == nil || l.doc.State != k.State {
			continue // another state's bookkeeping is stale
		}
		lm := l.doc.meta.ForState(l.doc.State)
		if lm.Claims > m.Claims {
			m.Claims, changed = lm.Claims, true
		}
		if lm.Claims > seen && lm.Attempts > m.Attempts {
			m.Attempts, changed = lm.Attempts, true
		}
		// An expired claim the kept branch never saw may have run: keep
		// it, so the expiry policy decides, under its own key.
		if c := lm.Claim; c != nil && !lm.Yielded && c.Attempt > seen && m.Claim == nil {
			m.Claim, m.Key, changed = c, lm.Key, true
		}
	}
	return m, changed
}

func copyBody(body map[string]json.RawMessage) map[string]json.RawMessage {
	out := make(map[string]json.RawMessage, len(body))
	for k, v := range body {
		out[k] = v
	}
	return out
}

func mustMarshal(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("workflow: %v", err)) // strings and plain maps only
	}
	return b
}

// maxFields returns, for the kept branch's spec, each MaxFields counter
// whose highest number over all branches is above the kept branch's, so
// that removing a branch never lowers a handler's count.
func (e *Engine) maxFields(leaves []leaf, keep int) map[string]json.RawMessage {
	k := leaves[keep].doc
	if k == nil {
		return nil
	}
	spec, ok := e.specs[key{k.Type, k.State}]
	if !ok || len(spec.MaxFields) == 0 {
		return nil
	}
	num := func(d *Doc, f string) (float64, bool) {
		var v float64
		if d == nil {
			return 0, false
		}
		ok, err := d.Field(f, &v)
		return v, ok && err == nil
	}
	var set map[string]json.RawMessage
	for _, f := range spec.MaxFields {
		cur, _ := num(k, f)
		best := cur
		for i, l := range leaves {
			if v, ok := num(l.doc, f); i != keep && ok && v > best {
				best = v
			}
		}
		if best > cur {
			if set == nil {
				set = map[string]json.RawMessage{}
			}
			set[f], _ = json.Marshal(best)
		}
	}
	return set
}
