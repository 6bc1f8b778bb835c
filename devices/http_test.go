package devices

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
)

// noMailer fails the test if anything is mailed: the confirmation page
// never sends mail.
type noMailer struct{ tb testing.TB }

func (m noMailer) Send(context.Context, Message) error {
	m.tb.Errorf("confirmation page sent a mail")
	return nil
}

// requestLog counts the requests that reached the database server.
type requestLog struct {
	mu    sync.Mutex
	paths []string
}

func (l *requestLog) add(p string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.paths = append(l.paths, p)
}

// since returns the requests after the first n.
func (l *requestLog) since(n int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.paths[n:]...)
}

func (l *requestLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.paths)
}

// linkPage is the confirmation page on a fresh database of the real test
// server, reached through a recording proxy: the tests see which requests a
// link caused.
func linkPage(tb testing.TB) (http.Handler, *requestLog) {
	tb.Helper()
	opts := couchtest.Options(tb)
	target, err := url.Parse(opts.URL)
	if err != nil {
		tb.Fatal(err)
	}
	log := &requestLog{}
	proxy := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		log.add(r.In.Method + " " + r.In.URL.EscapedPath())
		r.SetURL(target)
	}})
	tb.Cleanup(proxy.Close)
	opts.URL = proxy.URL
	client, err := couch.NewClient(opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = client.Close() })
	db := couchtest.NewDB(tb, client)
	devs, err := New(Options{Client: client, DB: db, Mailer: noMailer{tb}, From: "docstate@example.test",
		Secret: []byte(strings.Repeat("s", MinSecretLen)), Logger: testLogger(tb, &logBuffer{})})
	if err != nil {
		tb.Fatal(err)
	}
	return devs.Handler(), log
}

// confirm sends d and t to the page, by GET or as a POST form, and returns
// the status and body.
func confirm(h http.Handler, method, d, t string) (int, string) {
	q := url.Values{"d": {d}, "t": {t}}.Encode()
	var r *http.Request
	if method == http.MethodGet {
		r = httptest.NewRequest(method, ConfirmPath+"?"+q, nil)
	} else {
		r = httptest.NewRequest(method, ConfirmPath, strings.NewReader(q))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Code, w.Body.String()
}

// TestConfirmLinkRefusesHostileIDs: a link whose d= cannot be a device
// document gets the invalid-link page (404, no form), by GET and POST, and
// causes no database request; never a server error, and never a read of a
// design document or a CouchDB endpoint.
func TestConfirmLinkRefusesHostileIDs(t *testing.T) {
	t.Parallel()
	h, log := linkPage(t)
	token := strings.Repeat("A", tokenLen)
	for _, tc := range []struct{ name, d, t string }{
		{"empty", "", token},
		{"design document", DesignDocID, token},
		{"all docs", "_all_docs", token},
		{"changes", "_changes", token},
		{"local document", "_local/x", token},
		{"rate-limit document", AddressDocID("a@example.test"), token},
		{"overlong", strings.Repeat("a", maxIDLen+1), token},
		{"not UTF-8", "dev-\xff\xfe", token},
		{"truncated UTF-8", "dev-\xe2\x82", token},
		{"NUL", "dev\x00ice", token},
		{"newline", "dev\nice", token},
		{"DEL", "dev\x7fice", token},
		{"C1 control", "dev\u0085ice", token},
		{"token not base64url", "dev-1", strings.Repeat("!", tokenLen)},
		{"token with padding", "dev-1", strings.Repeat("A", tokenLen-1) + "="},
		{"token too short", "dev-1", token[1:]},
	} {
		for _, method := range []string{http.MethodGet, http.MethodPost} {
			n := log.len()
			code, body := confirm(h, method, tc.d, tc.t)
			if code != http.StatusNotFound || !strings.Contains(body, invalidPage().Title) || strings.Contains(body, `method="post"`) {
				t.Errorf("%s %s: %d, want 404 and the invalid-link page:\n%s", method, tc.name, code, body)
			}
			if reqs := log.since(n); len(reqs) > 0 {
				t.Errorf("%s %s: database requests %q", method, tc.name, reqs)
			}
		}
	}

	// Control: a plausible link to a missing device is looked up and
	// refused (403), which shows the proxy sees the page's requests.
	for _, d := range []string{"dev-missing", "dev/with/slashes", "gerät ☎ 1"} {
		n := log.len()
		if code, body := confirm(h, http.MethodPost, d, token); code != http.StatusForbidden {
			t.Errorf("POST %q: %d, want 403:\n%s", d, code, body)
		}
		if len(log.since(n)) == 0 {
			t.Errorf("POST %q: no database request seen", d)
		}
		if code, body := confirm(h, http.MethodGet, d, token); code != http.StatusOK || !strings.Contains(body, `method="post"`) {
			t.Errorf("GET %q: %d, want 200 with the form:\n%s", d, code, body)
		}
	}
}

// TestNoLinkForIDThePageRefuses: a device whose id the confirmation page
// would refuse (here a control character, which CouchDB allows) gets its
// code without a link, rather than a link that can only fail.
func TestNoLinkForIDThePageRefuses(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.BaseURL = "https://docstate.example.test" })
	f.start(t, nil)
	dv := newDevice(t, "dev-\u0085-ctl", "ctl@example.test")
	body := registerAndMail(t, f, mock, dv)
	codeIn(t, body)
	if strings.Contains(body, ConfirmPath) {
		t.Fatalf("mail for id %q has a link:\n%s", dv.id, body)
	}
}
