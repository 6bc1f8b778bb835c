package workflow

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzParseDoc feeds arbitrary bytes to the feed document decoder. It must
// never panic; a document it accepts has a non-empty string _id that is not
// a design or local document, a handled string type and a non-empty string
// state; a document of a handled type it refuses is either invalid with a
// reason (and its fields, so the reason can be recorded) or not ours; and
// the engine's metadata it read marshals and reads back the same.
func FuzzParseDoc(f *testing.F) {
	for _, s := range []string{
		`{"_id":"a","_rev":"1-x","type":"job","state":"new"}`,
		`{"_id":"a","type":"job","state":"new","docstate":{"state":"new","attempts":2,"claim":{"owner":"o","expires":"2026-01-01T00:00:00.000Z","attempt":1,"key":"a/new/1"},"due":"2026-01-01T00:00:00.000Z"}}`,
		`{"_id":"a","type":"job","state":7}`,
		`{"_id":"a","type":"job"}`,
		`{"_id":"a","type":"job","state":"new","docstate":"corrupt"}`,
		`{"_id":"_design/x","type":"job","state":"new"}`,
		`{"_id":"a","type":["job"],"state":"new"}`,
		`{"_id":"a","type":"other","state":"new"}`,
		`{"_id":"a","type":"job","state":"new","docstate":{"due":12}}`,
		`[1,2]`, `[]`, `"x"`, `null`, `{"_id":""}`, `{"_id":"a","type":"job","state":"","docstate":{"retry_at":"yesterday"}}`,
	} {
		f.Add([]byte(s))
	}
	hasType := func(t string) bool { return t == "job" }
	f.Fuzz(func(t *testing.T, raw []byte) {
		d, err := parseDoc(raw, hasType)
		var inv *invalidError
		switch {
		case err == nil:
			if d.ID == "" || strings.HasPrefix(d.ID, "_design/") || strings.HasPrefix(d.ID, "_local/") || d.Type != "job" || d.State == "" {
				t.Fatalf("accepted %q as id %q type %q state %q", raw, d.ID, d.Type, d.State)
			}
			b, err := json.Marshal(d.meta)
			if err != nil {
				t.Fatalf("meta of %q does not marshal: %v", raw, err)
			}
			var back Meta
			if err := json.Unmarshal(b, &back); err != nil {
				t.Fatalf("meta %s does not read back: %v", b, err)
			}
			if b2, _ := json.Marshal(back); string(b2) != string(b) {
				t.Fatalf("meta round trip %s -> %s", b, b2)
			}
		case errors.As(err, &inv):
			if d == nil || d.fields == nil || inv.reason == "" || d.Type != "job" {
				t.Fatalf("invalid %q without fields or reason: %v", raw, err)
			}
		case errors.Is(err, errNotOurs):
		default:
			t.Fatalf("%q: unclassified error %v", raw, err)
		}
	})
}

// FuzzStamp feeds arbitrary JSON to Stamp.UnmarshalJSON. A time it accepts
// must marshal, in the fixed-width form the resync scan compares as text,
// and read back as the same instant to the millisecond (the form's
// precision); marshalling that again gives the same bytes.
func FuzzStamp(f *testing.F) {
	for _, s := range []string{
		`"2026-01-01T00:00:00.000Z"`,
		`"2026-01-01T00:00:00.123456789+05:30"`,
		`"10000-01-01T00:00:00Z"`,
		`"-0001-01-01T00:00:00Z"`,
		`"0000-01-01T00:00:00Z"`,
		`"0000-01-01T00:00:00+00:01"`,
		`"0000-01-01T00:00:00-00:01"`,
		`"0001-01-01T00:00:00Z"`,
		`"9999-12-31T23:59:59-23:59"`,
		`"9999-12-31T23:59:59.999999999+23:59"`,
		`"9999-12-31T23:59:59.999Z"`,
		`"2026-01-01T00:00:00+24:00"`,
		`"2026-01-01T00:00:00+00:60"`,
		`"yesterday"`, `12`, `null`, `""`, `"2026-01-01"`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var s Stamp
		if err := s.UnmarshalJSON(raw); err != nil {
			return
		}
		b, err := s.MarshalJSON()
		if err != nil {
			t.Fatalf("%s accepted as %v, but does not marshal: %v", raw, s.Time, err)
		}
		if len(b) != len(timeLayout)+2 {
			t.Fatalf("%s marshals to %s, not the fixed-width form", raw, b)
		}
		var back Stamp
		if err := back.UnmarshalJSON(b); err != nil {
			t.Fatalf("%s marshals to %s, which does not read back: %v", raw, b, err)
		}
		if want := s.Truncate(time.Millisecond); !back.Equal(want) {
			t.Fatalf("%s -> %s -> %v, want %v", raw, b, back.Time, want)
		}
		if b2, err := back.MarshalJSON(); err != nil || string(b2) != string(b) {
			t.Fatalf("%s -> %s -> %s, %v", raw, b, b2, err)
		}
	})
}
