package devices

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/docstate/docstate/workflow"
)

func fuzzDevices() *Devices {
	return &Devices{opts: Options{MaxDocBytes: 16 << 10, MaxIterations: 1_000_000, Secret: []byte(strings.Repeat("s", 32))}, domain: "example.test"}
}

// FuzzParseRequest feeds arbitrary device documents to the request
// validation. It must never panic; what it accepts is safe to put into a
// mail and a _users entry (a bare address without CR/LF or spaces, a
// printable device name, hex credentials within bounds); what it refuses is
// a terminal error that says "invalid device document".
func FuzzParseRequest(f *testing.F) {
	good := `{"_id":"d1","type":"device","state":"new","owner":"a@example.com","device_name":"Phone","credentials":{"password_scheme":"pbkdf2","derived_key":"0123456789abcdef0123456789abcdef01234567","salt":"0123456789abcdef0123456789abcdef","iterations":1000}}`
	for _, s := range []string{
		good,
		strings.Replace(good, `a@example.com`, `a@example.com\r\nBcc: x@evil.test`, 1),
		strings.Replace(good, `"Phone"`, `"Ph\u2028one"`, 1),
		strings.Replace(good, `1000}`, `99999999}`, 1),
		strings.Replace(good, `"pbkdf2"`, `"simple"`, 1),
		strings.Replace(good, `"owner":"a@example.com"`, `"owner":["a@example.com"]`, 1),
		`{"_id":"d1","type":"device","state":"new"}`,
	} {
		f.Add([]byte(s))
	}
	d := fuzzDevices()
	f.Fuzz(func(t *testing.T, raw []byte) {
		doc, err := workflow.NewDoc(raw)
		if err != nil {
			return
		}
		r, err := d.parseRequest(doc)
		if err != nil {
			if !workflow.IsTerminal(err) || !strings.HasPrefix(err.Error(), "invalid device document: ") {
				t.Fatalf("refusal %v is not a terminal invalid-document error", err)
			}
			return
		}
		if CheckEmail(r.owner) != nil || strings.ContainsAny(r.owner, " \r\n<>\"") {
			t.Fatalf("accepted owner %q", r.owner)
		}
		if checkDeviceName(r.deviceName) != nil || strings.ContainsAny(r.deviceName, "\r\n") {
			t.Fatalf("accepted device name %q", r.deviceName)
		}
		if d.checkCredentials(r.creds) != nil || len(raw) > d.opts.MaxDocBytes {
			t.Fatalf("accepted credentials %+v in a %d-byte document", r.creds, len(raw))
		}
	})
}

// FuzzConfirmAttempt submits arbitrary confirmation attempts and link
// proofs against a stored code. Only the code itself (spaces and dashes
// ignored, within the length limit) or the right link proof may pass; no
// input panics.
func FuzzConfirmAttempt(f *testing.F) {
	const code = "12345678"
	for _, s := range []string{code, "1234-5678", " 1234 5678 ", "12345679", "", "１２３４５６７８", strings.Repeat("1", 300), "12345678\x00"} {
		f.Add(s, "", false)
	}
	f.Add("", "deadbeef", true)
	d := fuzzDevices()
	f.Fuzz(func(t *testing.T, attempt, proof string, useLink bool) {
		const id = "dev-1"
		fields := map[string]any{"_id": id, "type": "device", "state": "confirming", "confirm_attempt": attempt}
		st := codeState{codeHash: d.codeHash(id, code), linkHash: d.linkHash(id, "token")}
		if useLink {
			fields["confirm_link"] = proof
		}
		raw, _ := json.Marshal(fields)
		doc, err := workflow.NewDoc(raw)
		if err != nil {
			t.Fatal(err)
		}
		// As the handler does: the guess is counted into pending_check,
		// stored, read back and checked.
		b, err := json.Marshal(pendingOf(doc, 1))
		if err != nil {
			t.Fatal(err)
		}
		var p pendingCheck
		if err := json.Unmarshal(b, &p); err != nil {
			t.Fatal(err)
		}
		got := d.check(id, p, st) == ""
		want := strings.NewReplacer(" ", "", "-", "").Replace(attempt) == code && len(attempt) <= maxAttemptLen
		if useLink {
			want = proof == d.linkProof(id, st.linkHash)
		}
		if got != want {
			t.Fatalf("attempt %q proof %q link %v: passed %v, want %v", attempt, proof, useLink, got, want)
		}
	})
}

// FuzzConfirmPage drives the confirmation page, by GET and by POST, with
// arbitrary d and t values, against a real (empty) database. No input
// panics or gets a server error; a link that cannot be one the daemon mailed
// gets the invalid-link page without any database request, and a plausible
// one the form (GET) or a refusal after the lookup (POST: no device
// exists).
func FuzzConfirmPage(f *testing.F) {
	token := strings.Repeat("A", tokenLen)
	for _, s := range [][2]string{
		{"dev-1", token}, {"", token}, {"dev-1", ""}, {"_design/docstate-devices", token},
		{"_all_docs", token}, {"_changes", token}, {"device-address:00", token},
		{"dev-\xff", token}, {"dev\x00", token}, {"dev\u0085", token}, {"dev\u2028", token},
		{"a/b", token}, {"a%2Fb", token}, {"a?b#c", token}, {"..", token}, {"gerät ☎", token},
		{strings.Repeat("a", maxIDLen), token}, {strings.Repeat("a", maxIDLen+1), token},
		{"dev-1", strings.Repeat("-", tokenLen)}, {"dev-1", strings.Repeat("=", tokenLen)},
	} {
		f.Add(s[0], s[1])
	}
	h, log := linkPage(f)
	f.Fuzz(func(t *testing.T, d, tok string) {
		n := log.len()
		code, body := confirm(h, http.MethodGet, d, tok)
		switch {
		case code >= 500:
			t.Fatalf("GET d=%q t=%q: %d", d, tok, code)
		case plausible(d, tok) != (code == http.StatusOK):
			t.Fatalf("GET d=%q t=%q: %d, plausible %v", d, tok, code, plausible(d, tok))
		case code != http.StatusOK && !strings.Contains(body, invalidPage().Title):
			t.Fatalf("GET d=%q t=%q: %d without the invalid-link page", d, tok, code)
		}
		if reqs := log.since(n); len(reqs) > 0 {
			t.Fatalf("GET d=%q t=%q: database requests %q", d, tok, reqs)
		}
		code, _ = confirm(h, http.MethodPost, d, tok)
		reqs := log.since(n)
		switch {
		case code >= 500:
			t.Fatalf("POST d=%q t=%q: %d", d, tok, code)
		case !plausible(d, tok) && len(reqs) > 0:
			t.Fatalf("POST d=%q t=%q: implausible, yet database requests %q", d, tok, reqs)
		case plausible(d, tok) && code != http.StatusForbidden:
			// The form body can exceed maxFormBytes: 400, still no lookup.
			if code != http.StatusBadRequest || len(reqs) > 0 {
				t.Fatalf("POST d=%q t=%q: %d, want 403 (no such device)", d, tok, code)
			}
		}
	})
}
