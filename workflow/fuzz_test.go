package workflow

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
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
