package workflow

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/docstate/docstate/internal/couch"
)

// Claims on a CouchDB cluster.
//
// A clustered write goes to every replica of the document (n, 3 by default)
// and is answered 201 when a write quorum of them (w = n/2+1) took it, 202
// Accepted when at least one but fewer did. Two claims written at once on
// the same revision through different coordinators can therefore both be
// acknowledged: each replica takes the first of them to reach it and
// refuses the other, and the document ends up holding both as a stored
// conflict. kivik hands back a revision for 201 and 202 alike, so the
// engine reads the status from the transport (couch.RecordStatus).
//
// The rule, and why two engines never both run:
//
//  1. A claim answered 201 is won. Its quorum and a rival claim's quorum on
//     the same revision would share a replica (w > n/2), and a replica takes
//     only one child of a revision as an interactive edit, so two sibling
//     claims cannot both reach a quorum.
//  2. Any other answer (202, or a status the transport did not see) is not
//     a win. The engine proves it: it reads every live leaf of the document
//     (a quorum read); if a branch other than its own is there, it yields.
//     Otherwise it writes the same claim again on its own revision (the
//     confirmation) and needs 201 for it, then reads the leaves once more
//     and runs only if its branch is still the only live one.
//  3. Suppose two claims ran. Each had a 201 on its branch (its claim or its
//     confirmation) before its last read. Take the later of the two 201s:
//     by then the earlier branch was on a write quorum, every later read
//     quorum meets it (r + w > n), and branches are never removed while one
//     may still be proving (rule 5), so the engine behind the later 201
//     saw the other branch at its last read and did not run. A claim won by
//     rule 1 skips the reads, which is safe because a rival 201 on a sibling
//     claim is impossible (rule 1) and a rival confirmation after it sees it.
//  4. An engine that yields writes its branch once more, with no claim and
//     "yielded" set: a fact about a run that did not happen, so the branch
//     never outranks a real result when the conflict is resolved.
//  5. A conflicted workflow document is resolved by whichever engine reads
//     it, but only when no branch holds a live claim (a run in progress, or
//     a proof): one branch is kept and the others become tombstones. The
//     kept branch is not yielded, holds no claim if any branch holds none
//     (a written result), and is otherwise CouchDB's own winner (highest
//     generation, then highest revision id: the same answer on every node);
//     its bookkeeping takes what the others know that it does not (claim
//     counts never go down; an expired claim it never saw is kept so the
//     expiry policy still applies).
//
// Cost per unsafe run: nothing on a single server or a claim answered 201;
// after a 202, one read, one write and one more read (each read is two
// requests when the document is conflicted), plus one write when the claim
// yields.

// proof is what proveClaim decided.
type proof struct {
	won      bool
	rev      string // the claim's revision to run under, when won
	out      outcome
	conflict bool
}

// proveClaim decides whether the claim just written as rev with body may
// run. The claim write's status is in doc.writeCertain.
func (e *Engine) proveClaim(ctx context.Context, doc *Doc, body map[string]json.RawMessage, rev string) proof {
	if doc.writeCertain {
		return proof{won: true, rev: rev}
	}
	e.stats.claimsUnproven.Add(1)
	if leaves, err := e.leaves(ctx, doc.ID); err != nil || rivals(leaves, rev) {
		return e.yield(ctx, doc, body, rev, err)
	}
	confirm := copyBody(body)
	confirm["_rev"] = mustMarshal(rev)
	cctx, st := couch.RecordStatus(ctx)
	crev, err := e.db.Put(cctx, doc.ID, confirm)
	switch {
	case couch.IsConflict(err):
		// Someone wrote on our branch: only a resolver does, and it keeps
		// a branch with a live claim. Read again.
		return proof{conflict: true}
	case err != nil:
		// Whether the confirmation landed is unknown; the claim stays
		// and its lease decides.
		e.stats.claimsYielded.Add(1)
		return proof{out: transient}
	case !st.Certain():
		return e.yield(ctx, doc, confirm, crev, nil)
	}
	if leaves, err := e.leaves(ctx, doc.ID); err != nil || rivals(leaves, crev) {
		return e.yield(ctx, doc, confirm, crev, err)
	}
	e.stats.claimsProven.Add(1)
	return proof{won: true, rev: crev}
}

// yield gives up an unproven claim without running: its branch is written
// once more, claim removed and marked yielded, so that the resolver of the
// conflict knows it never ran.
func (e *Engine) yield(ctx context.Context, doc *Doc, body map[string]json.RawMessage, rev string, readErr error) proof {
	e.stats.claimsYielded.Add(1)
	var meta Meta
	if err := json.Unmarshal(body[metaField], &meta); err != nil {
		return proof{out: transient}
	}
	key := ""
	if meta.Claim != nil {
		key = meta.Claim.Key
	}
	meta.Claim, meta.Yielded = nil, true
	meta.Updated = stamp(time.Now())
	meta.setDue()
	// Due soon: the resync scan brings the document back for resolution
	// even if no feed row does. The delay is random so that engines that
	// both yielded on one race do not meet again on the next claim.
	again := time.Duration(rand.Int64N(int64(2*time.Second))) + 250*time.Millisecond
	meta.Due = stamp(time.Now().Add(again))
	out := copyBody(body)
	out["_rev"] = mustMarshal(rev)
	out[metaField] = mustMarshal(meta)
	if _, err := e.db.Put(ctx, doc.ID, out); err != nil && !couch.IsConflict(err) {
		// The claim stays until its lease ends; it did not run, and the
		// expiry policy will say it may have.
		e.log.Warn("unproven claim could not be marked as yielded", "id", doc.ID, "key", key, "err", err)
	}
	e.log.Info("claim not certain (202 or a rival branch); not running", "id", doc.ID, "type", doc.Type,
		"state", doc.State, "key", key, "read_err", readErr)
	return proof{out: finishedAfter(again)}
}

// leaf is one live branch of a document.
type leaf struct {
	rev string
	doc *Doc // nil when the branch is not a parseable workflow document
}

// leaves reads the document's winner and every live conflicting branch.
func (e *Engine) leaves(ctx context.Context, id string) ([]leaf, error) {
	raw, err := readRaw(ctx, e.db, id)
	if err != nil {
		return nil, err
	}
	doc, _ := parseDoc(raw, e.hasType)
	if doc == nil {
		var head struct {
			Rev       string   `json:"_rev"`
			Conflicts []string `json:"_conflicts"`
		}
		if err := json.Unmarshal(raw, &head); err != nil {
			return nil, fmt.Errorf("document %q: %w", id, err)
		}
		doc = &Doc{ID: id, Rev: head.Rev, conflicts: head.Conflicts}
	}
	return e.withConflicts(ctx, doc)
}

// withConflicts returns doc's branch and its conflicting branches.
func (e *Engine) withConflicts(ctx context.Context, doc *Doc) ([]leaf, error) {
	out := []leaf{{rev: doc.Rev, doc: doc}}
	if len(doc.conflicts) == 0 {
		return out, nil
	}
	rs := e.db.OpenRevs(ctx, doc.ID, doc.conflicts)
	defer rs.Close()
	for rs.Next() {
		var raw json.RawMessage
		if err := rs.ScanDoc(&raw); err != nil {
			return nil, fmt.Errorf("conflicting revisions of %q: %w", doc.ID, err)
		}
		// kivik hands out each revision of a multipart answer (CouchDB)
		// as one document, but a JSON answer (PouchDB Server) as one
		// array of {"ok": doc} or {"missing": rev} rows.
		var rows []map[string]json.RawMessage
		if len(raw) > 0 && raw[0] == '[' {
			if err := json.Unmarshal(raw, &rows); err != nil {
				return nil, fmt.Errorf("conflicting revisions of %q: %w", doc.ID, err)
			}
		} else {
			var row map[string]json.RawMessage
			if err := json.Unmarshal(raw, &row); err != nil {
				return nil, fmt.Errorf("conflicting revisions of %q: %w", doc.ID, err)
			}
			rows = append(rows, row)
		}
		for _, row := range rows {
			if l, ok := e.leafOf(row); ok {
				out = append(out, l)
			}
		}
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("conflicting revisions of %q: %w", doc.ID, err)
	}
	return out, nil
}

// leafOf returns the live branch in one open_revs row: {"ok": doc}, or
// the document itself; {"missing": rev} (removed since the winner was
// read) and tombstones are none.
func (e *Engine) leafOf(row map[string]json.RawMessage) (leaf, bool) {
	raw := json.RawMessage(nil)
	switch {
	case row["ok"] != nil:
		raw = row["ok"]
	case row["_id"] != nil:
		raw = mustMarshal(row)
	default:
		return leaf{}, false
	}
	var head struct {
		Rev     string `json:"_rev"`
		Deleted bool   `json:"_deleted"`
	}
	if json.Unmarshal(raw, &head) != nil || head.Deleted || head.Rev == "" {
		return leaf{}, false
	}
	d, _ := parseDoc(raw, e.hasType)
	return leaf{rev: head.Rev, doc: d}, true
}

// rivals reports whether a live branch other than rev exists.
func rivals(leaves []leaf, rev string) bool {
	for _, l := range leaves {
		if l.rev != rev {
			return true
		}
	}
	return false
}

// resolve removes a conflicted workflow document's losing branches (rule 5
// above). It runs before anything else is done with the document.
func (e *Engine) resolve(ctx context.Context, doc *Doc, fromHint bool) (outcome, bool) {
	if fromHint {
		return outcome{}, true // the feed's body may be older: read the server's
	}
	leaves, err := e.withConflicts(ctx, doc)
	if err != nil {
		e.log.Debug("cannot read conflicting revisions", "id", doc.ID, "err", err)
		return transient, false
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
		e.log.Debug("conflicted document has a live claim on a branch; resolving later", "id", doc.ID, "until", live)
		return finishedAfter(live.Sub(now) + time.Second), false
	}
	keep := survivor(leaves)
	merged, changed := mergeMeta(leaves, keep)
	if len(leaves) == 1 {
		return outcome{}, true // resolved meanwhile
	}
	set := e.maxFields(leaves, keep)
	if changed || len(set) > 0 {
		sdoc := leaves[keep].doc
		sdoc.db = e.db
		if _, _, err := e.commit(ctx, sdoc, "", set, nil, merged); err != nil {
			return e.settle(err, &e.stats.conflicts, func() outcome { return transient }, func(error) (outcome, bool) { return transient, false })
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
		return transient, false
	}
	removed := 0
	for _, r := range results {
		if r.Error == nil {
			removed++
		}
	}
	e.stats.conflictsResolved.Add(int64(removed))
	e.log.Info("conflicted document resolved", "id", doc.ID, "type", doc.Type, "kept", leaves[keep].rev, "removed", removed)
	return outcome{}, true // read the resolved document and go on from it
}

// liveClaim returns the expiry of a live, unyielded claim on a branch, or
// the zero time.
func liveClaim(l leaf, now time.Time) time.Time {
	if l.doc == nil {
		return time.Time{}
	}
	m := l.doc.meta.forState(l.doc.State)
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
		m := l.doc.meta.forState(l.doc.State)
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
	m := k.meta.forState(k.State)
	changed := m.Yielded
	m.Yielded = false
	seen := m.Claims
	for i, l := range leaves {
		if i == keep || l.doc == nil || l.doc.State != k.State {
			continue // another state's bookkeeping is stale
		}
		lm := l.doc.meta.forState(l.doc.State)
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
