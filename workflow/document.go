package workflow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
)

// metaField is the top-level field the engine owns on every document it
// handles. Keeping all engine bookkeeping under one key leaves the rest of the
// document to the application.
const metaField = "docstate"

// timeLayout is fixed-width UTC with milliseconds, so times compare as
// strings: the resync scan asks the server for "due <= now" with a plain
// string comparison.
const timeLayout = "2006-01-02T15:04:05.000Z"

// Stamp is a time written into documents in the engine's fixed-width format.
type Stamp struct{ time.Time }

// MarshalJSON writes the fixed-width UTC form. A time whose UTC year is
// outside 0000-9999 is an error rather than a longer or signed year: that
// text would neither sort with the others in the resync scan's string
// comparison nor parse back (RFC 3339 years have four digits).
func (s Stamp) MarshalJSON() ([]byte, error) {
	if err := checkYear(s.Time); err != nil {
		return nil, err
	}
	return []byte(`"` + s.UTC().Format(timeLayout) + `"`), nil
}

// UnmarshalJSON accepts the engine's form and any RFC 3339 time that
// MarshalJSON can write back. time.Parse takes a four-digit year with an
// offset of up to 24 hours, so "9999-12-31T23:59:59-23:59" is year 10000 in
// UTC and "0000-01-01T00:00:00+00:01" year -1: accepted, such a time from a
// document's docstate field would make the engine's write-back of that
// document fail.
func (s *Stamp) UnmarshalJSON(b []byte) error {
	str, err := strconv.Unquote(string(b))
	if err != nil {
		return fmt.Errorf("time must be a string: %w", err)
	}
	t, err := time.Parse(time.RFC3339Nano, str)
	if err != nil {
		return err
	}
	if err := checkYear(t); err != nil {
		return fmt.Errorf("time %q: %w", str, err)
	}
	s.Time = t
	return nil
}

// checkYear refuses a time whose UTC year does not fit the four digits of
// timeLayout. Year 0 fits ("0000" formats and parses back); it is only
// before the zero time, like any other early time.
func checkYear(t time.Time) error {
	if y := t.UTC().Year(); y < 0 || y > 9999 {
		return fmt.Errorf("year %d in UTC is outside 0000-9999", y)
	}
	return nil
}

func stamp(t time.Time) *Stamp {
	if t.IsZero() {
		return nil
	}
	return &Stamp{t.UTC().Truncate(time.Millisecond)}
}

func (s *Stamp) time() time.Time {
	if s == nil {
		return time.Time{}
	}
	return s.Time
}

// Claim is an unsafe handler's hold on a document, written before it runs.
type Claim struct {
	// Owner identifies the engine instance that holds the claim.
	Owner string `json:"owner"`
	// Expires is when the lease runs out and others may take over.
	Expires Stamp `json:"expires"`
	// Attempt counts claims taken in this state, 1-based.
	Attempt int `json:"attempt"`
	// Key is the idempotency key for side effects: "<doc id>/<state>/<n>".
	// It names the operation, not the run: every run until one has its
	// result written shares it, the takeover of an expired claim and the
	// retry after a recorded failure alike, because an earlier run's side
	// effect may have happened (a mail accepted, then the connection lost)
	// and a repeat must be recognisable as the same operation. A new key
	// comes only after a result was written.
	Key string `json:"key"`
	// Takeover is set when this claim replaced an expired one.
	Takeover bool `json:"takeover,omitempty"`
}

// ErrorInfo is recorded when a document moves to its error state.
type ErrorInfo struct {
	// From is the state the document failed in; retry moves it back there.
	From     string `json:"from"`
	Reason   string `json:"reason"`
	Attempts int    `json:"attempts"`
	At       Stamp  `json:"at"`
}

// Meta is the engine's bookkeeping under the document's "docstate" field.
// Everything but Error and Invalid refers to the state named in State: when
// the document's state differs (someone else moved it), it is stale and
// ignored.
type Meta struct {
	State     string     `json:"state,omitempty"`
	Attempts  int        `json:"attempts,omitempty"`
	Claims    int        `json:"claims,omitempty"`
	Claim     *Claim     `json:"claim,omitempty"`
	RetryAt   *Stamp     `json:"retry_at,omitempty"`
	WakeAt    *Stamp     `json:"wake_at,omitempty"`
	Due       *Stamp     `json:"due,omitempty"`
	LastError string     `json:"last_error,omitempty"`
	From      string     `json:"from,omitempty"`
	Error     *ErrorInfo `json:"error,omitempty"`
	Invalid   string     `json:"invalid,omitempty"`
	// Settled is the revision generation the engine's last write of a
	// "stay" result produced. While the document is still at that
	// generation nothing has changed since the handler ran, so it is not
	// run again (unless a wake-up is due): without this an unsafe handler
	// that stays would be re-triggered by its own write, forever.
	Settled int    `json:"settled,omitempty"`
	Updated *Stamp `json:"updated,omitempty"`
	// Key is the idempotency key of the state's unsafe operation that has
	// no result written yet: set with the first claim, kept through failed
	// runs and takeovers (see Claim.Key), cleared with the result.
	Key string `json:"key,omitempty"`
	// Yielded marks a branch of a conflicted document whose claim was not
	// certain and did not run (see prove.go): when the conflict is
	// resolved it never outranks a branch that holds a result.
	Yielded bool `json:"yielded,omitempty"`
}

// ForState returns the bookkeeping that applies to state: the stale fields
// (those of an earlier state) are dropped.
func (m Meta) ForState(state string) Meta {
	if m.State == state {
		return m
	}
	return Meta{State: state, From: m.From, Error: m.Error}
}

// setDue recomputes Due, the earliest time the engine must look at the
// document again without a feed event. The resync scan queries it.
func (m *Meta) setDue() {
	var due time.Time
	for _, t := range []time.Time{m.RetryAt.time(), m.WakeAt.time(), claimExpiry(m.Claim)} {
		if !t.IsZero() && (due.IsZero() || t.Before(due)) {
			due = t
		}
	}
	m.Due = stamp(due)
}

func claimExpiry(c *Claim) time.Time {
	if c == nil {
		return time.Time{}
	}
	return c.Expires.Time
}

// Doc is a document as a handler sees it. Handlers read it; they change it
// only by returning a Result.
type Doc struct {
	ID    string
	Rev   string
	Type  string
	State string
	// Attempt is this run's number in the current state, 1-based: failed
	// attempts so far plus one.
	Attempt int
	// LastError is the previous failed attempt's error, if any.
	LastError string
	// Claim is set for unsafe handlers: the claim this run holds.
	Claim *Claim

	fields map[string]json.RawMessage
	raw    []byte
	meta   Meta
	db     *kivik.DB
	// claimedGen is the revision generation this run's claim wrote.
	claimedGen int
	// conflicts are the document's conflicting revisions, as read.
	conflicts []string
	// writeCertain is set by the engine's last write of the document when
	// the server answered 201 Created, not 202 Accepted.
	writeCertain bool
}

// DB returns the database the document was read from: in many-database
// mode each user's database is another one. It is nil for a Doc from
// NewDoc.
func (d *Doc) DB() *kivik.DB { return d.db }

// Decode unmarshals the whole document into v.
func (d *Doc) Decode(v any) error {
	if err := json.Unmarshal(d.raw, v); err != nil {
		return fmt.Errorf("decode document %q: %w", d.ID, err)
	}
	return nil
}

// Field unmarshals top-level field name into v. It reports false when the
// field is absent or null.
func (d *Doc) Field(name string, v any) (bool, error) {
	raw, ok := d.fields[name]
	if !ok || bytes.Equal(raw, []byte("null")) {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("field %q of document %q: %w", name, d.ID, err)
	}
	return true, nil
}

// Has reports whether top-level field name is present and not null.
func (d *Doc) Has(name string) bool {
	raw, ok := d.fields[name]
	return ok && !bytes.Equal(raw, []byte("null"))
}

// Raw returns the document's JSON. The caller must not modify it.
func (d *Doc) Raw() []byte { return d.raw }

// Meta returns the engine's bookkeeping as read.
func (d *Doc) Meta() Meta { return d.meta }

// errNotOurs marks documents the engine does not handle: no string type or
// type without handlers. They are skipped without a write.
var errNotOurs = errors.New("not a workflow document")

// invalidError is a document of a handled type that cannot be handled; the
// reason is recorded on it.
type invalidError struct {
	reason string
	// keepMeta is set when the engine field itself is unreadable: writing
	// a reason would overwrite it, and with it possibly a live claim.
	keepMeta bool
}

func (e *invalidError) Error() string { return e.reason }

// NewDoc parses a document's JSON as the engine would hand it to a
// handler, for testing handlers without a server. It returns an error for
// everything the engine would skip or record as invalid: no string _id,
// type or non-empty state, a design or local document, or a malformed
// "docstate" field.
func NewDoc(raw []byte) (*Doc, error) {
	d, err := parseDoc(raw, func(string) bool { return true })
	if err != nil {
		return nil, err
	}
	d.Attempt = d.meta.ForState(d.State).Attempts + 1
	return d, nil
}

// parseDoc decodes raw into a Doc. hasType says whether a type has handlers.
// It returns errNotOurs for foreign documents and *invalidError for documents
// of a handled type with a malformed state or engine field; fields is set
// even then, so the reason can be recorded.
func parseDoc(raw []byte, hasType func(string) bool) (*Doc, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, fmt.Errorf("%w: body is not a JSON object: %v", errNotOurs, err)
	}
	d := &Doc{fields: fields, raw: raw}
	if err := unmarshalString(fields["_id"], &d.ID); err != nil || d.ID == "" {
		return nil, fmt.Errorf("%w: no _id", errNotOurs)
	}
	_ = unmarshalString(fields["_rev"], &d.Rev)
	if c, ok := fields["_conflicts"]; ok {
		// Read with conflicts=true; the list is not part of the document
		// and must not be written back with it.
		_ = json.Unmarshal(c, &d.conflicts)
		delete(fields, "_conflicts")
	}
	if strings.HasPrefix(d.ID, "_design/") || strings.HasPrefix(d.ID, "_local/") {
		return nil, fmt.Errorf("%w: design or local document", errNotOurs)
	}
	typRaw, ok := fields["type"]
	if !ok {
		return nil, fmt.Errorf("%w: no type field", errNotOurs)
	}
	if err := unmarshalString(typRaw, &d.Type); err != nil {
		return nil, fmt.Errorf("%w: type is not a string", errNotOurs)
	}
	if !hasType(d.Type) {
		return nil, fmt.Errorf("%w: no handlers for type %q", errNotOurs, d.Type)
	}
	if metaRaw, ok := fields[metaField]; ok && !bytes.Equal(metaRaw, []byte("null")) {
		if err := json.Unmarshal(metaRaw, &d.meta); err != nil {
			// Refusing to handle keeps a possibly live claim from being
			// overwritten: a corrupt claim must not become a second run.
			return d, &invalidError{reason: fmt.Sprintf("field %q is not valid engine metadata: %v", metaField, err), keepMeta: true}
		}
	}
	stateRaw, ok := fields["state"]
	if !ok {
		return d, &invalidError{reason: "no state field"}
	}
	if err := unmarshalString(stateRaw, &d.State); err != nil {
		return d, &invalidError{reason: fmt.Sprintf("state must be a string, got %s", jsonKind(stateRaw))}
	}
	if d.State == "" {
		return d, &invalidError{reason: "state is empty"}
	}
	return d, nil
}

func unmarshalString(raw json.RawMessage, s *string) error {
	if len(raw) == 0 || raw[0] != '"' {
		return errors.New("not a string")
	}
	return json.Unmarshal(raw, s)
}

func jsonKind(raw json.RawMessage) string {
	if len(raw) == 0 {
		return "nothing"
	}
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		return "a number"
	}
}

// revGeneration returns the numeric prefix of a revision ("3-abc" → 3).
func revGeneration(rev string) int {
	n, _, _ := strings.Cut(rev, "-")
	g, err := strconv.Atoi(n)
	if err != nil {
		return 0
	}
	return g
}

// build returns the document body to write: the fields as read (everything
// the application and CouchDB put there is kept, attachment stubs included),
// with state, changed fields and meta applied.
func build(fields map[string]json.RawMessage, state string, set map[string]json.RawMessage, unset []string, meta *Meta) (map[string]json.RawMessage, error) {
	out := make(map[string]json.RawMessage, len(fields)+len(set)+1)
	for k, v := range fields {
		out[k] = v
	}
	for _, k := range unset {
		delete(out, k)
	}
	for k, v := range set {
		out[k] = v
	}
	if state != "" {
		b, err := json.Marshal(state)
		if err != nil {
			return nil, err
		}
		out["state"] = b
	}
	if meta != nil {
		b, err := json.Marshal(meta)
		if err != nil {
			return nil, err
		}
		out[metaField] = b
	}
	return out, nil
}
