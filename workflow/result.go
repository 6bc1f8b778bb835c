package workflow

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Result is what a handler asks the engine to write: a next state (or none,
// to stay), field changes, and an optional wake-up time.
//
// Build one with Transition or Stay and chain Set, Unset and WakeAt. Results
// are values; each method returns a modified copy.
type Result struct {
	next   string
	set    map[string]any
	unset  []string
	wakeAt time.Time
	// recheck asks for another run after it without writing a wake-up.
	recheck time.Duration
	// unsettled is set when the result was merged onto a revision whose
	// fields changed under the handler: the write must not mark the
	// document settled, so the handler sees the change.
	unsettled bool
}

// Transition moves the document to state next.
func Transition(next string) Result { return Result{next: next} }

// Stay keeps the document in its state. With no field changes and no wake-up
// the engine writes nothing.
func Stay() Result { return Result{} }

// Set sets a top-level field. Fields the engine owns (_id, _rev, type, state,
// docstate) cannot be set; the engine rejects such a result as a handler bug.
func (r Result) Set(field string, value any) Result {
	m := make(map[string]any, len(r.set)+1)
	for k, v := range r.set {
		m[k] = v
	}
	m[field] = value
	r.set = m
	return r
}

// Unset removes a top-level field.
func (r Result) Unset(field string) Result {
	r.unset = append(append([]string(nil), r.unset...), field)
	return r
}

// WakeAt asks the engine to run the handler of the document's state again at
// t even if the document does not change, e.g. to expire a confirmation
// code. It only makes sense with Stay; a transition clears wake-ups.
func (r Result) WakeAt(t time.Time) Result {
	r.wakeAt = t
	return r
}

// RecheckAfter asks the engine to run the handler again after d even if
// the document does not change, like WakeAt, but without writing the time
// on the document: a periodic check that finds nothing to do writes no
// revision (replicating clients see none). The timer lives in the engine
// only: an engine that stops forgets it, and the start scan
// (Options.NoStartScan false, the default) runs the handler again. Use
// WakeAt for what must happen at a time even across restarts, such as an
// expiry. WakeAt wins when both are set.
func (r Result) RecheckAfter(d time.Duration) Result {
	r.recheck = d
	return r
}

// Next returns the target state, "" when staying.
func (r Result) Next() string { return r.next }

// touched lists the fields the result sets or unsets.
func (r Result) touched() []string {
	out := make([]string, 0, len(r.set)+len(r.unset))
	for k := range r.set {
		out = append(out, k)
	}
	return append(out, r.unset...)
}

// mergedOnto returns r for writing onto a revision someone else wrote
// while the handler ran: changes to the fields in changed (which that
// writer touched) are dropped, and the result is unsettled, since the
// handler has not seen that revision.
func (r Result) mergedOnto(changed []string) Result {
	r.unsettled = true
	if len(changed) == 0 {
		return r
	}
	drop := make(map[string]bool, len(changed))
	for _, f := range changed {
		drop[f] = true
	}
	set := make(map[string]any, len(r.set))
	for k, v := range r.set {
		if !drop[k] {
			set[k] = v
		}
	}
	var unset []string
	for _, k := range r.unset {
		if !drop[k] {
			unset = append(unset, k)
		}
	}
	r.set, r.unset = set, unset
	return r
}

// reserved fields are written only by the engine.
func reserved(field string) bool {
	switch field {
	case "_id", "_rev", "_deleted", "_attachments", "_conflicts", "_revisions", "type", "state", metaField:
		return true
	}
	return len(field) > 0 && field[0] == '_'
}

func (r Result) validate() error {
	if r.next != "" {
		if err := checkName("next state", r.next); err != nil {
			return err
		}
	}
	for k := range r.set {
		if k == "" || reserved(k) {
			return fmt.Errorf("result sets reserved or empty field %q", k)
		}
	}
	for _, k := range r.unset {
		if k == "" || reserved(k) {
			return fmt.Errorf("result unsets reserved or empty field %q", k)
		}
	}
	return nil
}

// encodeSet marshals the field values once, so a merge retry after a 409
// reuses them and a value that cannot be marshalled is a handler bug found
// before anything is written.
func (r Result) encodeSet() (map[string]json.RawMessage, error) {
	out := make(map[string]json.RawMessage, len(r.set))
	for k, v := range r.set {
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("result field %q: %w", k, err)
		}
		out[k] = b
	}
	return out, nil
}

// terminalError marks an error that retrying cannot fix.
type terminalError struct{ err error }

func (e *terminalError) Error() string { return e.err.Error() }
func (e *terminalError) Unwrap() error { return e.err }

// Terminal wraps err so the engine moves the document to its error state at
// once instead of retrying. Terminal(nil) is nil.
func Terminal(err error) error {
	if err == nil {
		return nil
	}
	return &terminalError{err: err}
}

// IsTerminal reports whether err was wrapped by Terminal.
func IsTerminal(err error) bool {
	var t *terminalError
	return errors.As(err, &t)
}

// retryAfterError asks for a retry at a given delay, counted as an attempt.
type retryAfterError struct {
	err   error
	after time.Duration
}

func (e *retryAfterError) Error() string { return e.err.Error() }
func (e *retryAfterError) Unwrap() error { return e.err }

// RetryAfter wraps err so the next attempt waits d instead of the handler's
// backoff, e.g. for a server's Retry-After. It still counts as a failed
// attempt. To wait without failing, return Stay().WakeAt(t).
func RetryAfter(d time.Duration, err error) error {
	if err == nil {
		err = errors.New("retry requested")
	}
	return &retryAfterError{err: err, after: d}
}

// Changes returns the fields the result sets (values as given to Set) and
// unsets, for handler wrappers that need to know what a run will write,
// such as a status they publish elsewhere. The map is a copy.
func (r Result) Changes() (set map[string]any, unset []string) {
	set = make(map[string]any, len(r.set))
	for k, v := range r.set {
		set[k] = v
	}
	return set, append([]string(nil), r.unset...)
}
