package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
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
//  1. On a database that keeps one copy of each document (its info reports
//     n=1, or no cluster at all: PouchDB Server, CouchDB 1), a claim
//     answered 201 is won: the one copy took it, and a rival's write on the
//     same revision got 409.
//  2. On a replicated database a claim runs only after a 201 on its branch
//     (the claim itself, or a confirmation: the same claim written again on
//     its own revision) followed by a read of every leaf (open_revs=all)
//     that shows no other live branch. Any other answer or sight yields.
//     A 201 alone is not enough there: two claims written on different
//     parents (the two sides of a stored conflict that a read did not
//     show, or a parent that itself got a 202) can each reach a quorum. A
//     GET with conflicts=true is not enough either: it answers with the
//     first r replicas that agree, and a branch only the third holds is
//     not in it (fabric_doc_open), where open_revs=all merges the leaves of
//     the replicas it hears.
//  3. Suppose two claims ran. Take the later of their 201s: by then the
//     earlier branch was on a write quorum, every later read of r replicas
//     meets it (r + w > n), and branches are never removed while one may
//     still be proving (rule 5), so the engine behind the later 201 saw the
//     other branch at its read and did not run.
//  4. An engine that yields writes its branch once more, with no claim and
//     "yielded" set: a fact about a run that did not happen, so the branch
//     never outranks a real result when the conflict is resolved.
//  5. A conflicted workflow document is resolved by whichever engine reads
//     it, but only when no branch holds a live claim (a run in progress, or
//     a proof): one branch is kept and the others become tombstones. The
//     branches are read with open_revs=all too, so a live claim is not
//     missed. The kept branch is not yielded, holds no claim if any branch
//     holds none (a written result), and is otherwise CouchDB's own winner
//     (highest generation, then highest revision id: the same answer on
//     every node); its bookkeeping takes what the others know that it does
//     not (claim counts never go down; an expired claim it never saw is
//     kept so the expiry policy still applies).
//
// Cost per unsafe run: nothing on a single copy. On a replicated database,
// one read for a claim answered 201; after a 202, one read, one write and
// one more read; plus one write when the claim yields. The number of copies
// is read once per engine from the database's info.
//
// Rule 5, the resolution of a conflicted document, is in conflicts.go.

// proof is what proveClaim decided.
type proof struct {
	won bool
	rev string  // the claim's revision to run under, when won
	out outcome // when not won: conflicted, or how the run ends
}

// proveClaim decides whether the claim just written as rev with body may
// run. The claim write's status is in doc.writeCertain.
func (e *Engine) proveClaim(ctx context.Context, doc *Doc, body map[string]json.RawMessage, rev string) proof {
	if doc.writeCertain {
		if !e.replicated(ctx) {
			return proof{won: true, rev: rev} // one copy: a 201 is the whole truth
		}
		// Rule 1: one read, and the claim must be the only live branch.
		if leaves, err := e.leaves(ctx, doc.ID); err != nil || rivals(leaves, rev) {
			return e.yield(ctx, doc, body, rev, err)
		}
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
		return proof{out: conflicted}
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
	e.hidden.Store(doc.ID, true)
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

// errDeleted says every leaf of a document is a tombstone.
var errDeleted = errors.New("deleted")

// replicated reports whether the database keeps more than one copy of each
// document (couch.Replicas), asked once; when the server cannot say, the
// answer is yes until it can, which costs reads and never a double run.
func (e *Engine) replicated(ctx context.Context) bool {
	switch e.copies.Load() {
	case 1:
		return false
	case 0:
		n, err := couch.Replicas(ctx, e.db)
		if err != nil {
			e.log.Debug("cannot tell whether the database is replicated; proving claims as on a cluster", "err", err)
			return true
		}
		e.copies.Store(int32(n))
		return n > 1
	}
	return true
}

// leaf is one live branch of a document.
type leaf struct {
	rev string
	doc *Doc // nil when the branch is not a parseable workflow document
}

// leaves reads every live branch of the document with open_revs=all, the
// read that on a cluster merges what each replica it asks holds (a GET with
// conflicts=true shows one replica's view; see couch.OpenAllRevs).
func (e *Engine) leaves(ctx context.Context, id string) ([]leaf, error) {
	rs := couch.OpenAllRevs(ctx, e.db, id)
	defer rs.Close()
	var out []leaf
	for rs.Next() {
		var raw json.RawMessage
		if err := rs.ScanDoc(&raw); err != nil {
			return nil, fmt.Errorf("leaf revisions of %q: %w", id, err)
		}
		// kivik hands out each revision of a multipart answer (CouchDB)
		// as one document, but a JSON answer (PouchDB Server) as one
		// array of {"ok": doc} or {"missing": rev} rows.
		var rows []map[string]json.RawMessage
		if len(raw) > 0 && raw[0] == '[' {
			if err := json.Unmarshal(raw, &rows); err != nil {
				return nil, fmt.Errorf("leaf revisions of %q: %w", id, err)
			}
		} else {
			var row map[string]json.RawMessage
			if err := json.Unmarshal(raw, &row); err != nil {
				return nil, fmt.Errorf("leaf revisions of %q: %w", id, err)
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
		return nil, fmt.Errorf("leaf revisions of %q: %w", id, err)
	}
	if len(out) == 0 {
		// Every leaf a tombstone: deleted meanwhile.
		return nil, fmt.Errorf("leaf revisions of %q: %w", id, errDeleted)
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
