package devices

import (
	"encoding/json"
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
		got := d.check(doc, st) == ""
		want := strings.NewReplacer(" ", "", "-", "").Replace(attempt) == code && len(attempt) <= maxAttemptLen
		if useLink {
			want = proof == d.linkProof(id, st.linkHash)
		}
		if got != want {
			t.Fatalf("attempt %q proof %q link %v: passed %v, want %v", attempt, proof, useLink, got, want)
		}
	})
}
