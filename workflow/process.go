package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

// outcome is how a run ended.
type outcome struct {
	// finished: the changes the run covered are handled, or recorded on the
	// document (a retry time, a claim held by another) where the resync scan
	// will find them. Unfinished runs are repeated with backoff and keep
	// their changes out of the checkpoint.
	finished bool
	// after asks for another look at the document after this delay.
	after time.Duration
}

var (
	finished  = outcome{finished: true}
	transient = outcome{}
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
		out, conflict := e.evaluate(ctx, raw, &read, fromHint)
		if !conflict {
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
	// engine resolves before acting on the document (prove.go).
	if err := db.Get(ctx, id, kivik.Param("conflicts", true)).ScanDoc(&raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// evaluate decides from the document's current type and state what to do.
// conflict means a write lost to a newer revision: read again and repeat.
// fromHint says raw is the feed's body, which may be older than the
// document on the server.
func (e *Engine) evaluate(ctx context.Context, raw []byte, read *int, fromHint bool) (outcome, bool) {
	doc, err := parseDoc(raw, e.hasType)
	if doc != nil {
		*read = revGeneration(doc.Rev)
		doc.db = e.db
	}
	var invalid *invalidError
	switch {
	case errors.As(err, &invalid) && e.opts.PassStateless && !doc.Has("state"):
		e.stats.skipped.Add(1)
		return finished, false
	case errors.As(err, &invalid):
		return e.recordInvalid(ctx, doc, invalid)
	case err != nil:
		e.stats.skipped.Add(1)
		return finished, false
	}
	if len(doc.conflicts) > 0 {
		return e.resolve(ctx, doc, fromHint)
	}
	spec, ok := e.specs[key{doc.Type, doc.State}]
	if !ok {
		return e.noHandler(ctx, doc)
	}
	meta := doc.meta.forState(doc.State)
	now := time.Now()
	if meta.Claim == nil {
		if t := meta.RetryAt.time(); t.After(now) {
			return finishedAfter(t.Sub(now)), false
		}
		wake := meta.WakeAt.time()
		if meta.Settled != 0 && meta.Settled == revGeneration(doc.Rev) && (wake.IsZero() || wake.After(now)) && !e.takeRecheck(doc.ID) {
			// Nothing changed since the handler ran and stayed.
			if !wake.IsZero() {
				return finishedAfter(wake.Sub(now)), false
			}
			return finished, false
		}
	}
	doc.Attempt = meta.Attempts + 1
	doc.LastError = meta.LastError
	if spec.Mode == Unsafe {
		if c := meta.Claim; fromHint && c != nil && c.Expires.After(now) {
			// A live claim in the feed's body may be long released on
			// the server (our own claim's row, read back after the run):
			// look at the server's copy before waiting out a lease.
			return outcome{}, true
		}
		out, conflict := e.runUnsafe(ctx, doc, spec, meta)
		// The run knows the revision its claim wrote: the feed's row for
		// it (its body still showing the claim) must not bring the
		// document back as held by a live claim of our own.
		*read = max(*read, doc.claimedGen)
		return out, conflict
	}
	release, err := e.acquireSlot(ctx)
	if err != nil {
		return transient, false
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

// runUnsafe claims the document, runs the handler only if the claim was
// accepted, and writes the result under the claim.
func (e *Engine) runUnsafe(ctx context.Context, doc *Doc, spec Spec, meta Meta) (outcome, bool) {
	now := time.Now()
	claim := &Claim{Owner: e.opts.Owner, Attempt: meta.Claims + 1} // Expires once a slot is ours
	claim.Key = meta.Key
	if claim.Key == "" {
		claim.Key = fmt.Sprintf("%s/%s/%d", doc.ID, doc.State, claim.Attempt)
	}
	if held := meta.Claim; held != nil {
		if held.Expires.After(now) {
			e.stats.claimsHeld.Add(1)
			// Look again when the lease runs out, in case its owner died.
			return finishedAfter(held.Expires.Sub(now) + time.Second), false
		}
		reason := fmt.Sprintf("claim %s of %s expired at %s before its result was written; the handler may have run",
			held.Key, held.Owner, held.Expires.UTC().Format(timeLayout))
		if spec.OnExpired == FailExpired {
			e.stats.claimsExpired.Add(1)
			return e.fail(ctx, doc, spec, meta, reason, meta.Attempts+1)
		}
		meta.Attempts++
		if meta.Attempts >= spec.MaxAttempts {
			e.stats.claimsExpired.Add(1)
			return e.fail(ctx, doc, spec, meta, reason, meta.Attempts)
		}
		meta.LastError = reason
		claim.Key = held.Key
		claim.Takeover = true
	}
	before := doc.meta.forState(doc.State)
	meta.Claim = claim
	meta.Claims = claim.Attempt
	meta.Key = claim.Key
	meta.RetryAt = nil
	// The claim is written before the handler's slot is free (see
	// ahead.go), so claims share group commits at any concurrency; the
	// gate bounds how many wait for a slot. Not for FailExpired: a claim
	// stranded by a crash before its handler started would send a
	// document that never ran to the error state, so those take their slot
	// first, and a crash strands at most Workers of them.
	var release func()
	if spec.OnExpired == FailExpired {
		var err error
		if release, err = e.acquireSlot(ctx); err != nil {
			return transient, false
		}
		defer release()
	} else if err := e.ahead.enter(ctx, e, spec.Lease); err != nil {
		return transient, false
	}
	inGate := release == nil
	leaveGate := func() {
		if inGate {
			inGate = false
			e.ahead.leave()
		}
	}
	defer leaveGate()
	claim.Expires = Stamp{time.Now().Add(spec.Lease).UTC().Truncate(time.Millisecond)}
	body, rev, err := e.commit(ctx, doc, "", nil, nil, meta)
	if err != nil {
		return e.settle(err, &e.stats.claimsLost, nil, func(err error) (outcome, bool) {
			return e.fail(ctx, doc, spec, meta, fmt.Sprintf("claim write rejected: %v", err), meta.Attempts+1)
		})
	}
	p := e.proveClaim(ctx, doc, body, rev) // a 202 is not a win on a cluster
	if !p.won {
		return p.out, p.conflict
	}
	rev = p.rev
	if claim.Takeover {
		e.stats.claimsTakenOver.Add(1)
		e.log.Warn("took over expired claim", "id", doc.ID, "type", doc.Type, "state", doc.State, "key", claim.Key)
	}
	e.stats.claimsWon.Add(1)
	doc.claimedGen = revGeneration(rev)
	if err := doc.reset(body, rev, meta); err != nil {
		return e.fail(ctx, doc, spec, meta, err.Error(), meta.Attempts+1)
	}
	doc.Claim = claim
	doc.Attempt = meta.Attempts + 1
	doc.LastError = meta.LastError

	if release == nil {
		var out outcome
		var ok bool
		release, out, ok = e.waitForSlot(ctx, doc, spec, before, &meta)
		leaveGate()
		if !ok {
			return out, false
		}
		defer release()
		claim = meta.Claim
	}

	// The run must end, result written, before the lease does.
	runCtx, cancel := context.WithDeadline(ctx, claim.Expires.Add(-spec.Lease/10))
	defer cancel()
	began := time.Now()
	res, herr := e.call(runCtx, spec, doc)
	e.ahead.observe(time.Since(began))
	release()
	return e.finishClaim(ctx, doc, spec, meta, claim, res, herr), false
}

// finishClaim writes an unsafe run's result. The claim makes the result
// ours to write: on a conflict (someone else edited the document meanwhile)
// it is merged onto the newer revision as long as the claim is still ours.
// Only when the claim is gone, taken over after expiry, is it dropped.
func (e *Engine) finishClaim(ctx context.Context, doc *Doc, spec Spec, meta Meta, claim *Claim, res Result, herr error) outcome {
	seen := doc.fields
	for attempt := 1; ; attempt++ {
		var out outcome
		var conflict bool
		if herr != nil {
			out, conflict = e.recordFailure(ctx, doc, spec, meta, herr)
		} else {
			out, conflict = e.commitResult(ctx, doc, spec, meta, res, true)
		}
		if !conflict {
			if out.finished {
				return out
			}
			wait := retry.Backoff(attempt, 100*time.Millisecond, 5*time.Second)
			if time.Now().Add(wait).After(claim.Expires.Time) || !retry.Sleep(ctx, wait) {
				e.log.Warn("result of unsafe run not written before its lease ran out; the expiry policy decides",
					"id", doc.ID, "type", doc.Type, "state", doc.State, "key", claim.Key, "policy", spec.OnExpired)
				return transient
			}
			continue
		}
		raw, err := e.read(ctx, doc.ID)
		if err != nil {
			if _, tooLarge := couch.AsTooLarge(err); tooLarge || couch.IsNotFound(err) {
				// Grown past the limit during the run: the next run
				// refuses it.
				return finished
			}
			continue
		}
		fresh, err := parseDoc(raw, e.hasType)
		if fresh != nil {
			fresh.db = e.db
		}
		c := (*Claim)(nil)
		if err == nil && fresh.State == doc.State && fresh.meta.State == doc.State {
			c = fresh.meta.Claim
		}
		if c == nil || c.Owner != claim.Owner || c.Attempt != claim.Attempt {
			e.stats.resultsDropped.Add(1)
			e.log.Warn("unsafe result dropped: the claim was taken over or the document moved on",
				"id", doc.ID, "type", doc.Type, "state", doc.State, "key", claim.Key)
			return finished
		}
		fresh.Claim, fresh.Attempt, fresh.LastError = doc.Claim, doc.Attempt, doc.LastError
		// Someone else wrote while the handler ran (a device's new attempt,
		// say). The handler decided on what it saw: fields it touches that
		// changed since are left as the other writer made them, and the
		// document is not marked settled, so the handler runs again and
		// sees the newer revision, whatever changed in it.
		if herr == nil {
			res = res.mergedOnto(changedFields(seen, fresh.fields, res.touched()))
		}
		doc, meta = fresh, fresh.meta.forState(fresh.State)
	}
}

// acquireSlot waits for one of the Workers handler slots. release is
// idempotent, so a deferred call may follow an early one.
func (e *Engine) acquireSlot(ctx context.Context) (release func(), err error) {
	select {
	case e.handlerSlots <- struct{}{}:
		return sync.OnceFunc(func() { <-e.handlerSlots }), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
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
func (e *Engine) commitResult(ctx context.Context, doc *Doc, spec Spec, meta Meta, res Result, claimed bool) (outcome, bool) {
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
			return e.after(doc.ID, res), false
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
		func(err error) (outcome, bool) {
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

// recordFailure records a failed run: a retry time, or the error state once
// the error is terminal or the attempts are used up.
func (e *Engine) recordFailure(ctx context.Context, doc *Doc, spec Spec, meta Meta, herr error) (outcome, bool) {
	if ctx.Err() != nil {
		// Stopping: the failure is ours, not the document's.
		return transient, false
	}
	reason := truncate(herr.Error(), maxReason)
	attempts := meta.Attempts + 1
	if IsTerminal(herr) || attempts >= spec.MaxAttempts {
		return e.fail(ctx, doc, spec, meta, reason, attempts)
	}
	delay := spec.Backoff(attempts)
	var ra *retryAfterError
	if errors.As(herr, &ra) {
		delay = ra.after
	}
	next := meta
	next.Attempts, next.LastError, next.Claim = attempts, reason, nil
	next.RetryAt = stamp(time.Now().Add(delay))
	_, _, err := e.commit(ctx, doc, "", nil, nil, next)
	return e.settle(err, &e.stats.conflicts,
		func() outcome {
			e.stats.retries.Add(1)
			e.log.Warn("handler failed; will retry", "id", doc.ID, "type", doc.Type, "state", doc.State,
				"attempt", attempts, "max_attempts", spec.MaxAttempts, "retry_in", delay.Round(time.Millisecond), "err", reason)
			return finishedAfter(delay)
		},
		func(error) (outcome, bool) { return e.fail(ctx, doc, spec, meta, reason, attempts) })
}

// fail moves the document to its error state with the reason.
func (e *Engine) fail(ctx context.Context, doc *Doc, spec Spec, meta Meta, reason string, attempts int) (outcome, bool) {
	next := Meta{
		From:  doc.State,
		Error: &ErrorInfo{From: doc.State, Reason: truncate(reason, maxReason), Attempts: attempts, At: Stamp{time.Now().UTC()}},
	}
	_, _, err := e.commit(ctx, doc, spec.ErrorState, nil, nil, next)
	return e.settle(err, &e.stats.conflicts,
		func() outcome {
			e.stats.failed.Add(1)
			e.log.Error("document failed", "id", doc.ID, "type", doc.Type, "state", doc.State,
				"error_state", spec.ErrorState, "attempts", attempts, "reason", reason)
			return finished
		},
		func(err error) (outcome, bool) {
			// Even the error record is refused (a validation function,
			// say). Nothing more can be written; the reason is in this log.
			e.log.Error("document failed and its error could not be recorded", "id", doc.ID, "type", doc.Type,
				"state", doc.State, "reason", reason, "write_err", err)
			return finished, false
		})
}

// recordInvalid notes on a document of a handled type why it cannot be
// handled, once.
func (e *Engine) recordInvalid(ctx context.Context, doc *Doc, inv *invalidError) (outcome, bool) {
	if inv.keepMeta || doc.meta.Invalid == inv.reason {
		if inv.keepMeta {
			e.stats.invalid.Add(1)
			e.log.Warn("document skipped", "id", doc.ID, "type", doc.Type, "reason", inv.reason)
		}
		return finished, false
	}
	next := doc.meta
	next.Invalid = inv.reason
	_, _, err := e.commit(ctx, doc, "", nil, nil, next)
	switch classify(err) {
	case writeOK:
		e.stats.invalid.Add(1)
		e.log.Warn("document is invalid; reason recorded", "id", doc.ID, "type", doc.Type, "reason", inv.reason)
		return finished, false
	case writeConflict:
		return outcome{}, true
	case writeTransient:
		return transient, false
	default:
		e.log.Warn("document is invalid; reason not recorded", "id", doc.ID, "type", doc.Type, "reason", inv.reason, "write_err", err)
		return finished, false
	}
}

// noHandler handles a document in a state without a handler: a terminal
// state, usually. Bookkeeping left from an earlier state whose due time
// would bring it back to every resync scan is cleared.
func (e *Engine) noHandler(ctx context.Context, doc *Doc) (outcome, bool) {
	if doc.meta.Due == nil || doc.meta.State == doc.State {
		return finished, false
	}
	next := Meta{From: doc.meta.From, Error: doc.meta.Error}
	_, _, err := e.commit(ctx, doc, "", nil, nil, next)
	switch classify(err) {
	case writeConflict:
		return outcome{}, true
	case writeTransient:
		return transient, false
	default:
		return finished, false
	}
}

// settle turns a write's error into the run's outcome. The policy is the
// same for every write: a conflict means the document moved on, so read it
// again (conflicts counts it); a missing document or database ends the run;
// an outage repeats it later. Success and a refusal of this particular
// document are the caller's to handle.
func (e *Engine) settle(err error, conflicts *atomic.Int64, ok func() outcome, rejected func(error) (outcome, bool)) (outcome, bool) {
	switch classify(err) {
	case writeOK:
		return ok(), false
	case writeConflict:
		conflicts.Add(1)
		return outcome{}, true
	case writeGone:
		return finished, false
	case writeRejected:
		return rejected(err)
	default:
		return transient, false
	}
}

// commit writes doc with state (unless ""), field changes and meta,
// compare-and-swap on doc.Rev. It returns the body written and the new rev.
func (e *Engine) commit(ctx context.Context, doc *Doc, state string, set map[string]json.RawMessage, unset []string, meta Meta) (map[string]json.RawMessage, string, error) {
	if meta.Invalid != "" && doc.State != "" && state == "" && doc.meta.Invalid == "" {
		meta.Invalid = ""
	}
	meta.Updated = stamp(time.Now())
	meta.setDue()
	if state == "" {
		meta.State = doc.State
	} else {
		meta.State = state
	}
	meta.Yielded = false
	body, err := build(doc.fields, state, set, unset, &meta)
	if err != nil {
		return nil, "", err
	}
	// The feed without bodies finishes the rows of these writes unread
	// (feedfetch.go); with bodies they are read anyway.
	_, handled := e.specs[key{doc.Type, meta.State}]
	claim := meta.Claim != nil && meta.Claim.Owner == e.opts.Owner
	track := e.idsOnly()
	if track && (!handled || claim) {
		e.ownRevs.begin(doc.ID)
		defer e.ownRevs.end(doc.ID)
	}
	sctx, st := couch.RecordStatus(ctx)
	rev, err := e.put(sctx, doc.ID, body)
	doc.writeCertain = st.Certain()
	if err == nil && track {
		e.ownRevs.add(doc.ID, rev, !handled, claim)
	}
	return body, rev, err
}

// put writes one document, compare-and-swap on the _rev in body, through
// the group commit when it is on.
func (e *Engine) put(ctx context.Context, id string, body map[string]json.RawMessage) (rev string, err error) {
	if e.batch != nil {
		rev, err = e.batch.put(ctx, id, body)
	} else {
		rev, err = e.db.Put(ctx, id, body)
	}
	if err == nil {
		e.own.Add(id, rev)
	}
	return rev, err
}

// reset makes doc reflect body after it was written as rev.
func (d *Doc) reset(body map[string]json.RawMessage, rev string, meta Meta) error {
	revJSON, err := json.Marshal(rev)
	if err != nil {
		return err
	}
	body["_rev"] = revJSON
	raw, err := json.Marshal(body)
	if err != nil {
		return err
	}
	d.fields, d.raw, d.Rev, d.meta = body, raw, rev, meta
	return nil
}

type writeResult int

const (
	writeOK writeResult = iota
	writeConflict
	writeGone
	writeRejected
	writeTransient
)

// classify sorts a write error. 401 means our credentials are wrong, which
// no document can fix: it is retried like an outage. Other 4xx answers are
// about this document (too large, refused by a validation function) and
// send it to the error state.
func classify(err error) writeResult {
	switch {
	case err == nil:
		return writeOK
	case couch.IsConflict(err):
		return writeConflict
	case couch.IsNotFound(err):
		return writeGone
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return writeTransient
	case couch.IsTransient(err), kivik.HTTPStatus(err) == http.StatusUnauthorized:
		return writeTransient
	default:
		return writeRejected
	}
}

const maxReason = 1000

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// changedFields returns those of fields whose value differs between two
// versions of a document, compared as JSON values.
func changedFields(before, after map[string]json.RawMessage, fields []string) []string {
	var out []string
	for _, f := range fields {
		a, inA := before[f]
		b, inB := after[f]
		if inA != inB || (inA && !sameFields(map[string]json.RawMessage{f: a}, map[string]json.RawMessage{f: b})) {
			out = append(out, f)
		}
	}
	return out
}

// sameFields reports whether every value in set equals the document's
// current value, compared as JSON values rather than bytes.
func sameFields(fields, set map[string]json.RawMessage) bool {
	for k, v := range set {
		cur, ok := fields[k]
		if !ok {
			return false
		}
		var a, b any
		if json.Unmarshal(cur, &a) != nil || json.Unmarshal(v, &b) != nil || !reflect.DeepEqual(a, b) {
			return false
		}
	}
	return true
}

// sameMeta compares bookkeeping that matters for a no-op: a stay that
// changes nothing is not written, so it does not wake the feed again.
func sameMeta(a, b Meta) bool {
	return a.Attempts == b.Attempts && a.LastError == b.LastError && a.Key == b.Key && a.Claim == nil && b.Claim == nil &&
		a.RetryAt.time().Equal(b.RetryAt.time()) && a.WakeAt.time().Equal(b.WakeAt.time()) && a.Invalid == ""
}
