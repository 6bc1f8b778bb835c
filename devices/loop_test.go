package devices

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/mailtest"
)

// TestFullLoopWithMaildevAuth: doc created → exactly one mail through a real
// SMTP server with AUTH → the code from the mail → device writes it → the
// _users entry works for basic auth as that device → device active.
func TestFullLoopWithMaildevAuth(t *testing.T) {
	t.Parallel()
	md := mailtest.StartMaildev(t, mailtest.MaildevOptions{User: "relay", Password: "relay-pass-7"})
	mailer, err := NewSMTPMailer(SMTPConfig{Host: md.Host(), Port: md.SMTPPort(), TLS: TLSNone,
		Username: "relay", Password: "relay-pass-7", HELO: "docstate.test", Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, mailer, nil)
	f.start(t, nil)

	dv := newDevice(t, "dev-alice-1", "alice@example.test")
	put(t, f.db, dv.doc())
	doc := waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)

	mails := md.WaitEmails(t, 1, 10*time.Second)
	time.Sleep(500 * time.Millisecond) // a second mail would show up by now
	if mails = md.WaitEmails(t, 1, 0); len(mails) != 1 {
		t.Fatalf("%d mails, want exactly 1", len(mails))
	}
	m := mails[0]
	if len(m.To) != 1 || m.To[0].Address != dv.owner || m.Subject != "Confirm your new device" {
		t.Fatalf("mail to %v subject %q", m.To, m.Subject)
	}
	if got, want := m.Header("Message-ID"), "<"+doc[FieldMessageID].(string)+">"; got != want {
		t.Fatalf("Message-ID %q, recorded %q", got, want)
	}
	if m.Header("Auto-Submitted") != "auto-generated" || !strings.Contains(m.HTML, "<code>") {
		t.Fatalf("mail lacks the Auto-Submitted header or the HTML part: %+v", m.Headers)
	}
	code := codeIn(t, m.Text)
	if !strings.Contains(m.HTML, code) {
		t.Fatal("HTML part lacks the code")
	}

	// Before confirmation the device has no credentials.
	name := UserName(dv.id, dv.creds.Salt)
	if s := basicAuthStatus(t, "/_session", name, dv.password); s != http.StatusUnauthorized {
		t.Fatalf("basic auth before confirmation: %d, want 401", s)
	}

	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = code[:4] + " " + code[4:] })
	doc = waitState(t, f.db, dv.id, StateActive, 30*time.Second)
	if doc[FieldCouchUser] != name || doc[FieldOwnerRole] != OwnerRole(dv.owner) {
		t.Fatalf("active doc: %s", mustJSON(doc))
	}
	for _, k := range []string{FieldCodeHash, FieldLinkHash, FieldCodeExpires, FieldConfirmAttempt} {
		if _, ok := doc[k]; ok {
			t.Errorf("active doc still has %s", k)
		}
	}
	gotName, roles := session(t, name, dv.password)
	if gotName != name || !slices.Equal(roles, []string{OwnerRole(dv.owner)}) {
		t.Fatalf("session as device: name %q roles %v, want %q [%s]", gotName, roles, name, OwnerRole(dv.owner))
	}
	if s := basicAuthStatus(t, "/_session", name, dv.password+"x"); s != http.StatusUnauthorized {
		t.Fatalf("basic auth with a wrong password: %d, want 401", s)
	}
	if n := len(md.WaitEmails(t, 1, 0)); n != 1 {
		t.Fatalf("%d mails after activation, want 1", n)
	}

	// The code is in no revision the daemon wrote: only in the one the
	// device wrote with its attempt (see doc.go on why that is acceptable).
	for _, rev := range revisions(t, f.db, dv.id) {
		if strings.Contains(rev, code) && !strings.Contains(rev, `"confirm_attempt"`) {
			t.Errorf("a revision without the device's attempt holds the code: %s", rev)
		}
	}
	if logs := f.logs.String(); strings.Contains(logs, code) || strings.Contains(logs, dv.password) ||
		strings.Contains(logs, dv.creds.DerivedKey) || strings.Contains(logs, "relay-pass-7") {
		t.Errorf("logs contain a secret:\n%s", logs)
	}
	if !strings.Contains(f.logs.String(), "confirmation mail sent") {
		t.Error("log capture is empty; the secrecy check proves nothing")
	}

	// Revocation disables the credentials.
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldRevokeRequested] = true })
	waitState(t, f.db, dv.id, StateRevoked, 30*time.Second)
	if s := basicAuthStatus(t, "/_session", name, dv.password); s != http.StatusUnauthorized {
		t.Fatalf("basic auth after revocation: %d, want 401", s)
	}
}

// TestConfirmationLink: GET shows a form and changes nothing; POST with the
// token activates; the token and code are in no revision.
func TestConfirmationLink(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.BaseURL = "https://docstate.example.test" })
	f.start(t, nil)
	srv := httptest.NewServer(f.devs.Handler())
	t.Cleanup(srv.Close)

	dv := newDevice(t, "dev-link", "link@example.test")
	body := registerAndMail(t, f, mock, dv)
	code := codeIn(t, body)
	i := strings.Index(body, "https://docstate.example.test/devices/confirm?")
	if i < 0 {
		t.Fatalf("no link in mail:\n%s", body)
	}
	link, err := url.Parse(strings.Fields(body[i:])[0])
	if err != nil {
		t.Fatal(err)
	}
	token := link.Query().Get("t")
	if link.Query().Get("d") != dv.id || len(token) != tokenLen {
		t.Fatalf("link %s", link)
	}
	before := settled(t, f.db, dv.id)

	resp, err := http.Get(srv.URL + ConfirmPath + "?" + link.RawQuery)
	if err != nil {
		t.Fatal(err)
	}
	page := readAll(t, resp)
	if resp.StatusCode != 200 || !strings.Contains(page, `method="post"`) || resp.Header.Get("Referrer-Policy") != "no-referrer" {
		t.Fatalf("GET: %d %s", resp.StatusCode, page)
	}
	time.Sleep(300 * time.Millisecond)
	if after := get(t, f.db, dv.id)["_rev"]; after != before {
		t.Fatal("GET changed the document")
	}

	// A wrong token of the right form: a character outside base64url
	// would be refused before the lookup (404), not by the hash check.
	bad := []byte(token)
	bad[0] = 'A'
	if token[0] == 'A' {
		bad[0] = 'B'
	}
	for _, tok := range []string{string(bad), strings.Repeat("A", tokenLen)} {
		resp, err = http.PostForm(srv.URL+ConfirmPath, url.Values{"d": {dv.id}, "t": {tok}})
		if err != nil {
			t.Fatal(err)
		}
		if readAll(t, resp); resp.StatusCode != http.StatusForbidden {
			t.Fatalf("POST with a wrong token: %d, want 403", resp.StatusCode)
		}
	}
	resp, err = http.PostForm(srv.URL+ConfirmPath, url.Values{"d": {dv.id}, "t": {token}})
	if err != nil {
		t.Fatal(err)
	}
	if page := readAll(t, resp); resp.StatusCode != 200 {
		t.Fatalf("POST: %d %s", resp.StatusCode, page)
	}
	waitState(t, f.db, dv.id, StateActive, 30*time.Second)
	if name, _ := session(t, UserName(dv.id, dv.creds.Salt), dv.password); name == "" {
		t.Fatal("device cannot log in after link confirmation")
	}
	for _, rev := range revisions(t, f.db, dv.id) {
		if strings.Contains(rev, code) || strings.Contains(rev, token) {
			t.Errorf("a revision holds the code or token: %s", rev)
		}
	}
	// Single use: the link no longer works.
	resp, err = http.PostForm(srv.URL+ConfirmPath, url.Values{"d": {dv.id}, "t": {token}})
	if err != nil {
		t.Fatal(err)
	}
	if readAll(t, resp); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("second POST: %d, want 403", resp.StatusCode)
	}
	if logs := f.logs.String(); strings.Contains(logs, code) || strings.Contains(logs, token) {
		t.Errorf("logs contain the code or token")
	}
}
