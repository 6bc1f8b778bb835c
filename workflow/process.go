package workflow

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

// outcome is how a run, or one round of it, ended: finished (perhaps with
// another look after a delay), transient (repeated with backoff), or
// conflicted (the round's write lost to a newer revision, or what it read
// may be stale: read the document again and repeat the round; a run never
// ends conflicted).
type outcome struct {
	// finished: the changes the run covered are handled, or recorded on the
	// document (a retry time, a claim held by another) where the resync scan
	// will find them. Unfinished runs are repeated with backoff and keep
	// their changes out of the checkpoint.
	finished bool
	// after asks for another look at the document after this delay.
	after time.Duration
	// conflict: read the document again and repeat the round.
	conflict bool
}

var (
	finished   = outcome{finished: true}
	transient  = outcome{}
	conflicted = outcome{conflict: true}
)

func finishedAfter(d time.Duration) outcome { return outcome{finished: true, after: d} }

// maxRounds bounds re-reads after conflicts in one run; a document that keeps
// changing under us is retried later with backoff.
const maxRounds = 5

// process runs one queued id and reports back to the queue and tracker.
func (e *Engine) process(ctx context.Context, w work) {
	e.stats.inflight.Add(1)
	defer e.stats.inflight.Add(-1)
	var out outcome
	var read int
	if e.members != nil && !e.members.mine(w.id) {
		// Another live member's: passed over unread. Should that member
		// leave, the rescan that follows queues it again here.
		e.members.skipped.Add(1)
		out = finished
	} else {
		out, read = e.handle(ctx, w)
		if e.idsOnly() {
			// A revision this engine wrote with nothing to do here (this
			// run's last write, often) is covered too: its feed row,
			// arriving while the run ends, needs no second run. Only with
			// the feed without bodies, whose rows of a conflicted document
			// carry no generation and are never covered so: a body's
			// _conflicts would be dropped with it.
			read = max(read, e.ownRevs.idleGen(w.id))
		}
	}
	if out.finished {
		e.progress.Store(time.Now().UnixNano())
		e.tr.done(w.tokens)
		e.q.forget(w.id)
		e.tr.done(e.q.done(w.id, nil, read))
		if out.after > 0 {
			e.q.addAfter(w.id, out.after)
		}
		return
	}
	e.stats.transient.Add(1)
	n := e.q.failed(w.id)
	e.q.done(w.id, w.tokens, 0)
	if ctx.Err() == nil {
		e.q.addAfter(w.id, retry.Backoff(n, e.opts.FeedRetryMin, e.opts.FeedRetryMax))
	}
}

// handle runs one id. It also returns the revision generation of the
// document as last read (0 when none was), which covers every change up to
// that generation.
func (e *Engine) handle(ctx context.Context, w work) (outcome, int) {
	raw, read := w.hint, 0
	// The run holds the document it works on in the byte budget: the
	// hint's bytes, reserved by the feed, or what it reads.
	held := e.budget.Load().Hold(int64(len(w.hint)))
	defer held.Release()
	for range maxRounds {
		fromHint := raw != nil
		if raw == nil {
			// The size is known only once read: reserve the limit,
			// keep what the document takes.
			if err := held.Acquire(ctx, int64(e.opts.MaxDocBytes)); err != nil {
				return transient, 0
			}
			var err error
			raw, err = e.read(ctx, w.id)
			held.Shrink(int64(len(raw)))
			if couch.IsNotFound(err) {
				return finished, 0 // deleted, or the database is gone
			}
			if tl, ok := couch.AsTooLarge(err); ok {
				e.refuseOversized(w.id, tl.Rev, tl.Size)
				return finished, revGeneration(tl.Rev)
			}
			if err != nil {
				e.log.Debug("cannot read document", "id", w.id, "err", err)
				return transient, 0
			}
		}
		if out := e.evaluate(ctx, raw, &read, fromHint); !out.conflict {
			return out, read
		}
		raw = nil
	}
	e.log.Debug("document kept changing during its run; retrying later", "id", w.id)
	return transient, 0
}

// read reads a document up to MaxDocBytes; a larger one is not read (the
// error is a *couch.TooLargeError).
func (e *Engine) read(ctx context.Context, id string) ([]byte, error) {
	raw, err := readRaw(couch.WithBodyLimit(ctx, int64(e.opts.MaxDocBytes)), e.db, id)
	if err == nil && len(raw) > e.opts.MaxDocBytes {
		// A client without the limiting transport read it whole.
		return nil, &couch.TooLargeError{Size: int64(len(raw)), Limit: int64(e.opts.MaxDocBytes)}
	}
	return raw, err
}

// readRaw returns a document's JSON as the server sent it.
func readRaw(ctx context.Context, db *kivik.DB, id string) ([]byte, error) {
	var raw jsonDoc
	// conflicts=true costs nothing and shows a stored conflict, which the
	// engine resolves before acting on the document (conflicts.go).
	if err := db.Get(ctx, id, kivik.Param("conflicts", true)).ScanDoc(&raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// evaluate decides from the document's current type and state what to do.
// conflict means a write lost to a newer revision: read again and repeat.
// fromHint says raw is the feed's body, which may be older than the
// document on the server.
func (e *Engine) evaluate(ctx context.Context, raw []byte, read *int, fromHint bool) outcome {
	doc, err := parseDoc(raw, e.hasType)
	if doc != nil {
		*read = revGeneration(doc.Rev)
		doc.db = e.db
	}
	var invalid *invalidError
	switch {
	case errors.As(err, &invalid) && e.opts.PassStateless && !doc.Has("state"):
		e.stats.skipped.Add(1)
		return finished
	case errors.As(err, &invalid):
		return e.recordInvalid(ctx, doc, invalid)
	case err != nil:
		e.stats.skipped.Add(1)
		return finished
	}
	if len(doc.conflicts) > 0 {
		return e.resolve(ctx, doc, fromHint)
	}
	if _, ok := e.hidden.Load(doc.ID); ok {
		// This engine saw a branch here that a GET may not show (a
		// replica's view): read every leaf before anything else.
		if fromHint {
			return conflicted
		}
		e.hidden.Delete(doc.ID)
		return e.resolve(ctx, doc, false)
	}
	spec, ok := e.specs[key{doc.Type, doc.State}]
	if !ok {
		return e.noHandler(ctx, doc)
	}
	meta := doc.meta.ForState(doc.State)
	now := time.Now()
	if meta.Claim == nil {
		if t := meta.RetryAt.time(); t.After(now) {
			return finishedAfter(t.Sub(now))
		}
		wake := meta.WakeAt.time()
		if meta.Settled != 0 && meta.Settled == revGeneration(doc.Rev) && (wake.IsZero() || wake.After(now)) && !e.takeRecheck(doc.ID) {
			// Nothing changed since the handler ran and stayed.
			if !wake.IsZero() {
				return finishedAfter(wake.Sub(now))
			}
			return finished
		}
	}
	doc.Attempt = meta.Attempts + 1
	doc.LastError = meta.LastError
	if spec.Mode == Unsafe {
		if c := meta.Claim; fromHint && c != nil && c.Expires.After(now) {
			// A live claim in the feed's body may be long released on
			// the server (our own claim's row, read back after the run):
			// look at the server's copy before waiting out a lease.
			return conflicted
		}
		out := e.runUnsafe(ctx, doc, spec, meta)
		// The run knows the revision its claim wrote: the feed's row for
		// it (its body still showing the claim) must not bring the
		// document back as held by a live claim of our own.
		*read = max(*read, doc.claimedGen)
		return out
	}
	release, err := e.acquireSlot(ctx)
	if err != nil {
		return transient
	}
	res, herr := e.call(ctx, spec, doc)
	release()
	if herr != nil {
		return e.recordFailure(ctx, doc, spec, meta, herr)
	}
	return e.commitResult(ctx, doc, spec, meta, res, false)
}

// takeRecheck reports (once) whether a recheck asked for id is due: the
// handler runs although nothing changed since it stayed.
func (e *Engine) takeRecheck(id string) bool {
	_, ok := e.rechecks.LoadAndDelete(id)
	return ok
}

// call runs the handler with its timeout, turning a panic into an error.
// The caller holds a handler slot.
func (e *Engine) call(ctx context.Context, spec Spec, doc *Doc) (res Result, err error) {
	e.stats.runs.Add(1)
	hctx, cancel := context.WithTimeout(ctx, spec.Timeout)
	defer cancel()
	began := time.Now()
	result := "ok"
	defer func() {
		if r := recover(); r != nil {
			e.stats.panics.Add(1)
			e.log.Error("handler panicked", "id", doc.ID, "type", doc.Type, "state", doc.State, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			err = fmt.Errorf("handler panicked: %v", r)
			result = "panic"
		}
		if err != nil {
			e.stats.runErrors.Add(1)
		}
		if e.opts.OnRun != nil {
			e.opts.OnRun(RunInfo{Type: doc.Type, State: doc.State, Mode: spec.Mode, Result: result, Duration: time.Since(began)})
		}
	}()
	res, err = spec.Handler.Handle(hctx, doc)
	switch {
	case err == nil:
	case errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
		err = fmt.Errorf("handler timed out after %v: %w", spec.Timeout, err)
		result = "timeout"
	case IsTerminal(err):
		result = "terminal"
	default:
		result = "error"
	}
	return res, err
}

// commitResult writes a handler's result.
func (e *Engine) commitResult(ctx context.Context, doc *Doc, spec Spec, meta Meta, res Result, claimed bool) outcome {
	if err := res.validate(); err != nil {
		return e.recordFailure(ctx, doc, spec, meta, Terminal(fmt.Errorf("handler returned an invalid result: %w", err)))
	}
	set, err := res.encodeSet()
	if err != nil {
		return e.recordFailure(ctx, doc, spec, meta, Terminal(fmt.Errorf("handler returned an invalid result: %w", err)))
	}
	state, next := "", meta
	if res.next != "" && res.next != doc.State {
		state, next = res.next, Meta{From: doc.State}
	} else {
		next.Attempts, next.LastError, next.RetryAt, next.Claim, next.Key = 0, "", nil, nil, ""
		next.WakeAt = stamp(res.wakeAt)
		next.Settled = revGeneration(doc.Rev) + 1
		if res.unsettled {
			next.Settled = 0
		}
		if !claimed && len(res.unset) == 0 && sameFields(doc.fields, set) && sameMeta(meta, next) {
			e.stats.noops.Add(1)
			return e.after(doc.ID, res)
		}
	}
	_, _, err = e.commit(ctx, doc, state, set, res.unset, next)
	return e.settle(err, &e.stats.conflicts,
		func() outcome {
			e.stats.transitions.Add(1)
			if state != "" {
				e.log.Debug("transition", "id", doc.ID, "type", doc.Type, "from", doc.State, "to", state)
				return finishedUntil(res.wakeAt)
			}
			return e.after(doc.ID, res)
		},
		func(err error) outcome {
			return e.recordFailure(ctx, doc, spec, meta, Terminal(fmt.Errorf("the server rejected the result: %w", err)))
		})
}

// after is a stay's outcome: its wake-up, or its in-memory recheck.
func (e *Engine) after(id string, res Result) outcome {
	if res.recheck > 0 && res.wakeAt.IsZero() {
		e.rechecks.Store(id, struct{}{})
		return finishedAfter(res.recheck)
	}
	return finishedUntil(res.wakeAt)
}

func finishedUntil(t time.Time) outcome {
	if t.IsZero() {
		return finished
	}
	return finishedAfter(max(time.Until(t), time.Millisecond))
}
