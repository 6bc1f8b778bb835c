package workflow

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/docstate/docstate/internal/couch"
)

// Unsafe runs write their claim before they wait for a handler slot, so the
// claims of many documents share one group commit even when only one handler
// may run at a time. A claim waiting for its slot keeps its lease alive by
// renewing it, and a stopping engine releases the claims it has not started,
// so a lease never runs out while its handler waits and a drain leaves no
// claim behind that nobody will run.

// aheadGate bounds the claims written and waiting for a handler slot. The
// bound adapts to the handlers: as many as the slots can start within a
// quarter of a lease at the handlers' recent pace, never fewer than the
// slots and never more than maxAhead. Instant handlers get a whole batch of
// claims ahead; slow ones (a mail relay taking a second) only a few, so that
// claims are not held long by a daemon that cannot run them soon while other
// daemons on the database are idle.
//
// The handlers are not always the limit: when writes are slow (a loaded
// server, a cluster proving every claim) a full batch of claims waits
// longer than the handlers' pace says, a long wait costs renewal writes
// (waitForSlot), and the renewals slow the writes further. So the
// bound also follows the waits themselves (observeWait): a wait past a
// twentieth of a lease cuts it by a quarter, at most once per such span;
// a shorter one lets it grow by one.
type aheadGate struct {
	slots, maxAhead int

	mu    sync.Mutex
	n     int           // claims ahead now (being written or waiting)
	avg   time.Duration // moving average of unsafe handler runs, 0: none yet
	bound int           // what the waits allow, slots..maxAhead
	cut   time.Time     // when bound was last cut
	wake  chan struct{} // closed and replaced when n falls or the bound grows
}

func newAheadGate(slots, maxAhead int) *aheadGate {
	maxAhead = max(maxAhead, slots)
	return &aheadGate{slots: slots, maxAhead: maxAhead, bound: maxAhead, wake: make(chan struct{})}
}

// limit is the bound for handlers leased for lease.
func (g *aheadGate) limit(lease time.Duration) int {
	if g.avg <= 0 {
		// Nothing measured yet: as many as can start at once, and as
		// many again.
		return min(2*g.slots, g.bound)
	}
	n := int(min(int64(g.slots)*int64(lease/4)/int64(g.avg), int64(g.bound)))
	return max(n, g.slots)
}

// observeWait folds in how long a claim waited for its slot.
func (g *aheadGate) observeWait(wait, lease time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	switch {
	case wait > lease/20:
		if now.Sub(g.cut) > lease/20 {
			g.bound, g.cut = max(g.slots, g.bound*3/4), now
		}
	case g.bound < g.maxAhead:
		g.bound++
		g.broadcast()
	}
}

// enter waits until one more claim may go ahead, or ctx ends.
func (g *aheadGate) enter(ctx context.Context, e *Engine, lease time.Duration) error {
	for parked := false; ; {
		select {
		case <-e.stopping:
			// A claim written now would only be released again.
			if parked {
				e.parked.Add(-1)
			}
			return errStopping
		default:
		}
		g.mu.Lock()
		if g.n < g.limit(lease) {
			if parked {
				e.parked.Add(-1)
			}
			g.n++
			g.mu.Unlock()
			return nil
		}
		wake := g.wake
		g.mu.Unlock()
		if !parked {
			parked = true
			e.parked.Add(1)
		}
		select {
		case <-wake:
		case <-e.stopping:
			e.parked.Add(-1)
			return errStopping
		case <-ctx.Done():
			e.parked.Add(-1)
			return ctx.Err()
		}
	}
}

// leave gives a place back: the claim's handler started, or the run ended
// before it.
func (g *aheadGate) leave() {
	g.mu.Lock()
	g.n--
	g.broadcast()
	g.mu.Unlock()
}

// observe folds one handler run's duration into the pace.
func (g *aheadGate) observe(d time.Duration) {
	g.mu.Lock()
	if g.avg == 0 {
		g.avg = max(d, time.Microsecond)
	} else {
		g.avg += (d - g.avg) / 8
		g.avg = max(g.avg, time.Microsecond)
	}
	g.broadcast()
	g.mu.Unlock()
}

func (g *aheadGate) broadcast() {
	close(g.wake)
	g.wake = make(chan struct{})
}

// waitForSlot waits for a handler slot while the run's claim is written and
// ours. It renews the claim when half its lease has gone by, and once more on
// getting the slot if what is left of the lease is less than the handler's
// timeout and a fifth of the lease: the handler then always has its whole
// timeout and its result a tenth of the lease to be written before the claim
// runs out (the run's deadline, runUnsafe). Renewing whenever a tenth of the
// lease had gone by, as it once did, renewed nearly every claim where writes
// are slow (a loaded server, a cluster's proofs): one more slow write per
// run that bought nothing the handler needed. When the engine stops first,
// the claim is released (the document is put back as it was) and the run
// ends unfinished, to be repeated after a restart. ok is false when the run
// must end: out says how.
func (e *Engine) waitForSlot(ctx context.Context, doc *Doc, spec Spec, before Meta, meta *Meta) (release func(), out outcome, ok bool) {
	e.stats.claimsWaiting.Add(1)
	e.parked.Add(1)
	waiting := true
	stopWaiting := func() {
		if waiting {
			waiting = false
			e.stats.claimsWaiting.Add(-1)
			e.parked.Add(-1)
		}
	}
	defer stopWaiting()
	claim := meta.Claim
	since := time.Now()
	renewAt := time.NewTimer(time.Until(claim.Expires.Add(-spec.Lease / 2)))
	defer renewAt.Stop()
	for {
		select {
		case e.handlerSlots <- struct{}{}:
			stopWaiting()
			e.ahead.observeWait(time.Since(since), spec.Lease)
			release = sync.OnceFunc(func() { <-e.handlerSlots })
			if time.Until(claim.Expires.Time) < spec.Timeout+spec.Lease/5 {
				if err := e.renewClaim(ctx, doc, spec, meta); err != nil {
					release()
					return nil, e.abandonClaim(ctx, doc, before, meta, fmt.Errorf("renewing the claim before its run: %w", err)), false
				}
			}
			return release, outcome{}, true
		case <-renewAt.C:
			if err := e.renewClaim(ctx, doc, spec, meta); err != nil {
				return nil, e.abandonClaim(ctx, doc, before, meta, fmt.Errorf("renewing the claim while it waited for a handler slot: %w", err)), false
			}
			renewAt.Reset(time.Until(claim.Expires.Add(-spec.Lease / 2)))
		case <-e.stopping:
			e.releaseClaim(ctx, doc, before, meta)
			return nil, transient, false
		case <-ctx.Done():
			return nil, transient, false
		}
	}
}

// renewClaim writes the run's claim again with its lease counted from now.
// A conflict (someone else wrote the document meanwhile) is merged as long
// as the claim on the newer revision is still this run's.
func (e *Engine) renewClaim(ctx context.Context, doc *Doc, spec Spec, meta *Meta) error {
	claim := meta.Claim
	expires := Stamp{time.Now().Add(spec.Lease).UTC().Truncate(time.Millisecond)}
	err := e.rewriteClaim(ctx, doc, meta, func(m *Meta) { m.Claim.Expires = expires })
	if err == nil {
		claim.Expires = expires
		e.stats.claimsRenewed.Add(1)
	}
	return err
}

// releaseClaim puts a document whose claim's handler never started back as
// it was before the claim, so another daemon, or this one after a restart,
// runs it without waiting out a lease and without counting an attempt.
func (e *Engine) releaseClaim(ctx context.Context, doc *Doc, before Meta, meta *Meta) {
	err := e.rewriteClaim(ctx, doc, meta, func(m *Meta) { *m = before })
	if err != nil {
		e.log.Warn("claim not released on stop; it runs out with its lease", "id", doc.ID, "type", doc.Type,
			"state", doc.State, "key", meta.Claim.Key, "err", err)
		return
	}
	e.stats.claimsReleased.Add(1)
}

// abandonClaim ends a run whose claim could not be kept alive: the claim is
// released if it still can be, and the run is repeated later.
func (e *Engine) abandonClaim(ctx context.Context, doc *Doc, before Meta, meta *Meta, err error) outcome {
	e.log.Warn("unsafe run given up before its handler started", "id", doc.ID, "type", doc.Type,
		"state", doc.State, "key", meta.Claim.Key, "err", err)
	if couch.IsNotFound(err) {
		return finished
	}
	e.releaseClaim(ctx, doc, before, meta)
	return transient
}

// errClaimGone: the document's claim is no longer this run's (taken over
// after expiry, or the document moved on).
var errClaimGone = errors.New("claim gone")

// errStopping: the engine began to drain before the claim was written.
var errStopping = errors.New("engine stopping")

// rewriteClaim writes doc again with change applied to its meta, while the
// claim on the server is still meta.Claim (same owner and attempt). On
// success doc and meta hold what was written.
func (e *Engine) rewriteClaim(ctx context.Context, doc *Doc, meta *Meta, change func(*Meta)) error {
	claim := *meta.Claim
	for range maxRounds {
		next := *meta
		c := *meta.Claim
		next.Claim = &c
		change(&next)
		body, rev, err := e.commit(ctx, doc, "", nil, nil, next)
		switch classify(err) {
		case writeOK:
			if err := doc.reset(body, rev, next); err != nil {
				return err
			}
			doc.claimedGen = revGeneration(rev)
			*meta = next
			if meta.Claim != nil {
				doc.Claim = meta.Claim
			}
			return nil
		case writeConflict:
		default:
			return err
		}
		raw, err := e.read(ctx, doc.ID)
		if err != nil {
			return err
		}
		fresh, err := parseDoc(raw, e.hasType)
		if err != nil {
			return fmt.Errorf("document changed under its claim: %w", err)
		}
		fm := fresh.meta.ForState(fresh.State)
		if fresh.State != doc.State || fm.Claim == nil || fm.Claim.Owner != claim.Owner || fm.Claim.Attempt != claim.Attempt {
			return fmt.Errorf("the claim is no longer ours: %w", errClaimGone)
		}
		fresh.db = e.db
		fresh.Claim, fresh.Attempt, fresh.LastError = doc.Claim, doc.Attempt, doc.LastError
		*doc, *meta = *fresh, fm
	}
	return fmt.Errorf("document kept changing under its claim")
}
