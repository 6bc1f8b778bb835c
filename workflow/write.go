package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// settle turns a write's error into the run's outcome. The policy is the
// same for every write: a conflict means the document moved on, so read it
// again (conflicts counts it); a missing document or database ends the run;
// an outage repeats it later. Success and a refusal of this particular
// document are the caller's to handle.
func (e *Engine) settle(err error, conflicts *atomic.Int64, ok func() outcome, rejected func(error) outcome) outcome {
	switch classify(err) {
	case writeOK:
		return ok()
	case writeConflict:
		conflicts.Add(1)
		return conflicted
	case writeGone:
		return finished
	case writeRejected:
		return rejected(err)
	default:
		return transient
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
