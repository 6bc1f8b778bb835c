package workflow

import (
	"context"
	"encoding/json"
	"slices"
	"sync"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// The feed without bodies. With include_docs the server sends every
// changed document whole to every engine that follows the database, and
// most of those bodies are thrown away: a member of a group handles only
// its own share, and every engine reads back, body and all, each document
// it has just written itself. The server (a single-threaded node, or a
// cluster's coordinator) pays for each as for a read. So the feed can ask
// for rows alone (id and leaf revisions, style=all_docs) and the engine
// fetches, in one POST _all_docs per feed answer, the bodies of just the
// rows it will run:
//
//   - a row of another live member's document is finished unread, as the
//     worker would have done (process);
//   - a row whose revision this engine wrote, when that revision has no
//     handler here (a transition to a final state, an error record), is
//     finished unread: the run that wrote it knew the whole document. So is
//     a row older than a revision this engine wrote since: the run that
//     wrote it read the document past that change, and its own write comes
//     with its own row;
//   - every other row's body is fetched, with conflicts=true, through the
//     same body limit and byte budget as the feed's bodies.
//
// Conflicts stay visible: style=all_docs lists every leaf revision, so a
// row with more than one leaf (a stored conflict, or a branch deleted
// after one) is never taken for the engine's own write, and its fetched
// body carries _conflicts for the resolver (conflicts.go).

// ownRevs remembers the last revision this engine wrote of each document,
// until the feed brings its row. Entries are small (no body); the map is
// bounded, and when full starts over, which only costs some fetches.
type ownRevs struct {
	mu   sync.Mutex
	revs map[string]ownRev
	max  int
	// writing counts, per id, writes in flight that will leave nothing
	// for another run once answered (idle or claim writes, see ownRev).
	writing map[string]int
}

type ownRev struct {
	rev string
	gen int
	// idle: the revision is in a state with no handler here. claim: it
	// holds this engine's claim, whose run (in progress, or repeated after
	// a failure) covers it, as its claimedGen says.
	idle, claim bool
}

func newOwnRevs(max int) *ownRevs {
	return &ownRevs{revs: make(map[string]ownRev), writing: make(map[string]int), max: max}
}

// begin notes a write of id about to be sent; end is called with its
// answer. Between the two the feed may already bring the write's row (the
// server notifies the feed before the writer has its answer): such a row
// goes to the run that is writing, which covers it once it ends (the
// write's rev, or a re-read after a conflict), rather than being fetched.
func (o *ownRevs) begin(id string) {
	o.mu.Lock()
	o.writing[id]++
	o.mu.Unlock()
}

func (o *ownRevs) end(id string) {
	o.mu.Lock()
	if o.writing[id]--; o.writing[id] <= 0 {
		delete(o.writing, id)
	}
	o.mu.Unlock()
}

// inFlight reports whether a write of id that begin noted is unanswered.
func (o *ownRevs) inFlight(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.writing[id] > 0
}

// add records that this engine wrote rev of id.
func (o *ownRevs) add(id, rev string, idle, claim bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.revs) >= o.max {
		if _, ok := o.revs[id]; !ok {
			clear(o.revs)
		}
	}
	o.revs[id] = ownRev{rev: rev, gen: revGeneration(rev), idle: idle, claim: claim}
}

// covers reports whether a feed row of id whose only leaf is rev needs
// nothing from this engine: rev is a revision it wrote with no handler or
// with its own claim, or one older than a revision it wrote since. An entry the row answers is
// dropped: later rows are newer.
func (o *ownRevs) covers(id, rev string) bool {
	gen := revGeneration(rev)
	o.mu.Lock()
	defer o.mu.Unlock()
	w, ok := o.revs[id]
	switch {
	case !ok || gen == 0:
		return false
	case rev == w.rev:
		delete(o.revs, id)
		return w.idle || w.claim
	case gen < w.gen:
		return true
	default:
		// Someone else's write after ours.
		delete(o.revs, id)
		return false
	}
}

// idleGen returns the generation of the revision of id this engine last
// wrote when that revision has no handler here (0: none known). A run of
// id covers every change up to it: the feed row of that very write may
// arrive while the run that wrote it is still ending.
func (o *ownRevs) idleGen(id string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	if w, ok := o.revs[id]; ok && w.idle {
		return w.gen
	}
	return 0
}

func (o *ownRevs) reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	clear(o.revs)
}

// fetchRow is a feed row whose body the engine fetches.
type fetchRow struct {
	id  string
	tok token
}

// sortRow decides what a row of an ids-only feed needs; it reports whether
// the row's body must be fetched, and returns the row's token with its
// revision generation when the row has a single leaf (several leaves: 0,
// until the fetch tells). leaves are the row's leaf revisions.
func (e *Engine) sortRow(id string, leaves []string, tok token) (token, bool) {
	if len(leaves) == 1 {
		tok.rev = revGeneration(leaves[0])
		if e.ownRevs.covers(id, leaves[0]) {
			e.stats.ownRows.Add(1)
			e.tr.done([]token{tok})
			return tok, false
		}
		if e.ownRevs.inFlight(id) && e.q.addIfBusy(id, tok) {
			e.stats.ownRows.Add(1)
			return tok, false
		}
	}
	if e.members != nil && !e.members.mine(id) {
		// Another live member's: passed over unread, as process would.
		e.members.skipped.Add(1)
		e.tr.done([]token{tok})
		return tok, false
	}
	return tok, true
}

// fetchBodies fetches the bodies of rows in batches of at most FeedBatch
// and queues each row with its body as a hint, or alone (the run then reads
// the document) when the budget for hints is used up or the fetch failed.
func (e *Engine) fetchBodies(ctx context.Context, rows []fetchRow) {
	for chunk := range slices.Chunk(rows, max(e.opts.FeedBatch, 1)) {
		e.fetchChunk(ctx, chunk)
	}
}

func (e *Engine) fetchChunk(ctx context.Context, rows []fetchRow) {
	keys := make([]string, 0, len(rows))
	for _, r := range rows {
		if r.tok.rev == 0 {
			// Several leaves: _bulk_get cannot show _conflicts, so the
			// run reads this one alone, with them.
			continue
		}
		keys = append(keys, r.id)
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)
	type fetched struct {
		body []byte
		gen  int
	}
	bodies := make(map[string]fetched, len(keys))
	refused := make(map[string]bool)
	fctx, cancel := context.WithTimeout(ctx, e.feedDeadline())
	defer cancel()
	// The transport cuts bodies over MaxDocBytes while the answer streams,
	// as on the feed (couch.WithBodyLimit).
	fctx = couch.WithBodyLimit(fctx, int64(e.opts.MaxDocBytes))
	take := func(id string, doc jsonDoc) {
		if size, ok := couch.TooLargeSize(doc); ok {
			e.refuseOversized(id, "", size)
			refused[id] = true
			return
		}
		if len(doc) > e.opts.MaxDocBytes {
			// A client without the limiting transport sent it whole.
			e.refuseOversized(id, "", int64(len(doc)))
			refused[id] = true
			return
		}
		var head struct {
			Rev string `json:"_rev"`
		}
		if _, dup := bodies[id]; dup || json.Unmarshal(doc, &head) != nil || !e.budget.Load().TryHint(int64(len(doc))) {
			return
		}
		bodies[id] = fetched{body: []byte(doc), gen: revGeneration(head.Rev)}
		e.stats.fetched.Add(1)
	}
	var err error
	if len(keys) > 0 {
		e.stats.fetches.Add(1)
		err = e.bulkGet(fctx, keys, take)
	}
	if err != nil && ctx.Err() == nil {
		e.log.Warn("feed bodies not fetched; the runs read them", "docs", len(keys), "err", err)
	}
	for _, r := range rows {
		if refused[r.id] {
			e.tr.done([]token{r.tok})
			continue
		}
		f, ok := bodies[r.id]
		if !ok || f.gen == 0 {
			if ok {
				e.budget.Load().HintDropped(int64(len(f.body)))
				delete(bodies, r.id)
			}
			e.q.add(r.id, nil, 0, r.tok)
			continue
		}
		delete(bodies, r.id)
		e.q.add(r.id, f.body, f.gen, r.tok)
	}
	// Left over only when a row's id came twice in one answer.
	for _, f := range bodies {
		e.budget.Load().HintDropped(int64(len(f.body)))
	}
}

// bulkGet fetches keys with _bulk_get, which shows no _conflicts.
func (e *Engine) bulkGet(ctx context.Context, keys []string, take func(id string, doc jsonDoc)) error {
	refs := make([]kivik.BulkGetReference, len(keys))
	for i, k := range keys {
		refs[i] = kivik.BulkGetReference{ID: k}
	}
	rs := e.db.BulkGet(ctx, refs)
	defer rs.Close()
	for row, err := range rs.Iterator() {
		if err != nil {
			return err
		}
		id, _ := row.ID()
		var doc jsonDoc
		if row.ScanDoc(&doc) != nil || len(doc) == 0 || id == "" {
			continue
		}
		take(id, doc)
	}
	return nil
}

// idsOnly reports whether the next feed request asks for rows without
// bodies: when FeedWithoutBodies asks it, and whenever this engine is one
// of several live members, where it measured faster (BenchmarkDaemons,
// same session, PouchDB Server); alone, with bodies, it measured the same
// and costs the server an extra request per feed answer.
func (e *Engine) idsOnly() bool {
	return e.opts.FeedWithoutBodies || (e.members != nil && e.members.seen() > 1)
}
