package workflow

import (
	"errors"
	"testing"
)

// TestStampYearRange: a time is accepted only if its UTC year fits the
// four digits of the engine's form, whatever its offset, so a hostile
// docstate field cannot hold a time the engine's write-back cannot write.
func TestStampYearRange(t *testing.T) {
	for in, want := range map[string]string{
		`"0000-01-01T00:00:00Z"`:                `"0000-01-01T00:00:00.000Z"`,
		`"0000-01-01T00:00:00-00:01"`:           `"0000-01-01T00:01:00.000Z"`,
		`"9999-12-31T23:59:59.999Z"`:            `"9999-12-31T23:59:59.999Z"`,
		`"9999-12-31T23:59:59+23:59"`:           `"9999-12-31T00:00:59.000Z"`,
		`"9999-12-31T23:59:59-23:59"`:           "", // 10000-01-01T23:58:59Z
		`"9999-12-31T23:59:59.999999999-00:01"`: "", // 10000-01-01T00:00:59Z
		`"0000-01-01T00:00:00+00:01"`:           "", // -0001-12-31T23:59:00Z
		`"0000-01-01T00:00:00.000000001+24:00"`: "",
		`"10000-01-01T00:00:00Z"`:               "",
		`"-0001-01-01T00:00:00Z"`:               "",
	} {
		var s Stamp
		err := s.UnmarshalJSON([]byte(in))
		if want == "" {
			if err == nil {
				t.Errorf("%s accepted as %v", in, s.Time)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", in, err)
			continue
		}
		if b, err := s.MarshalJSON(); err != nil || string(b) != want {
			t.Errorf("%s marshals to %s, %v; want %s", in, b, err, want)
		}
	}

	// In a document: the engine metadata is unreadable, so the engine
	// skips the document without writing (keepMeta) instead of failing to
	// write it back.
	raw := []byte(`{"_id":"a","type":"job","state":"new","docstate":{"state":"new","error":{"from":"x","reason":"r","attempts":1,"at":"9999-12-31T23:59:59-23:59"}}}`)
	_, err := parseDoc(raw, func(string) bool { return true })
	var inv *invalidError
	if !errors.As(err, &inv) || !inv.keepMeta {
		t.Fatalf("document with a year-10000 stamp: %v, want invalid engine metadata", err)
	}
}
