package workflow

import (
	"context"
	"errors"
	"time"
)

// recordFailure records a failed run: a retry time, or the error state once
// the error is terminal or the attempts are used up.
func (e *Engine) recordFailure(ctx context.Context, doc *Doc, spec Spec, meta Meta, herr error) outcome {
	if ctx.Err() != nil {
		// Stopping: the failure is ours, not the document's.
		return transient
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
		func(error) outcome { return e.fail(ctx, doc, spec, meta, reason, attempts) })
}

// fail moves the document to its error state with the reason.
func (e *Engine) fail(ctx context.Context, doc *Doc, spec Spec, meta Meta, reason string, attempts int) outcome {
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
		func(err error) outcome {
			// Even the error record is refused (a validation function,
			// say). Nothing more can be written; the reason is in this log.
			e.log.Error("document failed and its error could not be recorded", "id", doc.ID, "type", doc.Type,
				"state", doc.State, "reason", reason, "write_err", err)
			return finished
		})
}

// recordInvalid notes on a document of a handled type why it cannot be
// handled, once.
func (e *Engine) recordInvalid(ctx context.Context, doc *Doc, inv *invalidError) outcome {
	if inv.keepMeta || doc.meta.Invalid == inv.reason {
		if inv.keepMeta {
			e.stats.invalid.Add(1)
			e.log.Warn("document skipped", "id", doc.ID, "type", doc.Type, "reason", inv.reason)
		}
		return finished
	}
	next := doc.meta
	next.Invalid = inv.reason
	_, _, err := e.commit(ctx, doc, "", nil, nil, next)
	switch classify(err) {
	case writeOK:
		e.stats.invalid.Add(1)
		e.log.Warn("document is invalid; reason recorded", "id", doc.ID, "type", doc.Type, "reason", inv.reason)
		return finished
	case writeConflict:
		return conflicted
	case writeTransient:
		return transient
	default:
		e.log.Warn("document is invalid; reason not recorded", "id", doc.ID, "type", doc.Type, "reason", inv.reason, "write_err", err)
		return finished
	}
}

// noHandler handles a document in a state without a handler: a terminal
// state, usually. Bookkeeping left from an earlier state whose due time
// would bring it back to every resync scan is cleared.
func (e *Engine) noHandler(ctx context.Context, doc *Doc) outcome {
	if doc.meta.Due == nil || doc.meta.State == doc.State {
		return finished
	}
	next := Meta{From: doc.meta.From, Error: doc.meta.Error}
	_, _, err := e.commit(ctx, doc, "", nil, nil, next)
	switch classify(err) {
	case writeConflict:
		return conflicted
	case writeTransient:
		return transient
	default:
		return finished
	}
}

const maxReason = 1000

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
