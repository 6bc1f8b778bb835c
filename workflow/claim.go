package workflow

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

// runUnsafe claims the document, runs the handler only if the claim was
// accepted, and writes the result under the claim.
func (e *Engine) runUnsafe(ctx context.Context, doc *Doc, spec Spec, meta Meta) outcome {
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
			return finishedAfter(held.Expires.Sub(now) + time.Second)
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
	before := doc.meta.ForState(doc.State)
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
			return transient
		}
		defer release()
	} else if err := e.ahead.enter(ctx, e, spec.Lease); err != nil {
		return transient
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
		return e.settle(err, &e.stats.claimsLost, nil, func(err error) outcome {
			return e.fail(ctx, doc, spec, meta, fmt.Sprintf("claim write rejected: %v", err), meta.Attempts+1)
		})
	}
	p := e.proveClaim(ctx, doc, body, rev) // a 202 is not a win on a cluster
	if !p.won {
		return p.out
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
			return out
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
	return e.finishClaim(ctx, doc, spec, meta, claim, res, herr)
}

// finishClaim writes an unsafe run's result. The claim makes the result
// ours to write: on a conflict (someone else edited the document meanwhile)
// it is merged onto the newer revision as long as the claim is still ours.
// Only when the claim is gone, taken over after expiry, is it dropped.
func (e *Engine) finishClaim(ctx context.Context, doc *Doc, spec Spec, meta Meta, claim *Claim, res Result, herr error) outcome {
	seen := doc.fields
	for attempt := 1; ; attempt++ {
		var out outcome
		if herr != nil {
			out = e.recordFailure(ctx, doc, spec, meta, herr)
		} else {
			out = e.commitResult(ctx, doc, spec, meta, res, true)
		}
		if !out.conflict {
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
		doc, meta = fresh, fresh.meta.ForState(fresh.State)
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
