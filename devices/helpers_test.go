package devices

import (
	"bytes"
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/http"
	"net/mail"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

// testIterations keeps PBKDF2 cheap: PouchDB Server hashes in JavaScript on
// every basic-auth request.
const testIterations = 1000

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// device is a simulated device: it knows its password, the daemon never does.
type device struct {
	id, owner, name, password string
	creds                     Credentials
}

func newDevice(t testing.TB, id, owner string) device {
	t.Helper()
	pw := randomHex(t, 24)
	salt := randomHex(t, 16)
	key, err := pbkdf2.Key(sha1.New, pw, []byte(salt), testIterations, 20)
	if err != nil {
		t.Fatal(err)
	}
	return device{id: id, owner: owner, name: "phone of " + owner, password: pw,
		creds: Credentials{PasswordScheme: "pbkdf2", DerivedKey: hex.EncodeToString(key), Salt: salt, Iterations: testIterations}}
}

func (dv device) doc() map[string]any {
	return map[string]any{"_id": dv.id, "type": DocType, "state": StateNew, FieldOwner: dv.owner,
		FieldDeviceName: dv.name, FieldCredentials: dv.creds}
}

func put(t testing.TB, db *kivik.DB, doc map[string]any) {
	t.Helper()
	if _, err := db.Put(context.Background(), doc["_id"].(string), doc); err != nil {
		t.Fatalf("put %v: %v", doc["_id"], err)
	}
}

// update reads a doc, applies fn and writes it back, redoing on 409: what a
// device does through replication.
func update(t testing.TB, db *kivik.DB, id string, fn func(map[string]any)) {
	t.Helper()
	for range 20 {
		doc := get(t, db, id)
		fn(doc)
		_, err := db.Put(context.Background(), id, doc)
		if err == nil {
			return
		}
		if kivik.HTTPStatus(err) != http.StatusConflict {
			t.Fatalf("update %s: %v", id, err)
		}
	}
	t.Fatalf("update %s: kept conflicting", id)
}

func get(t testing.TB, db *kivik.DB, id string) map[string]any {
	t.Helper()
	var doc map[string]any
	if err := db.Get(context.Background(), id).ScanDoc(&doc); err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return doc
}

func waitState(t testing.TB, db *kivik.DB, id, state string, timeout time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var doc map[string]any
	for time.Now().Before(deadline) {
		doc = get(t, db, id)
		if doc["state"] == state {
			return doc
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: state %v, want %s within %v: %s", id, doc["state"], state, timeout, mustJSON(doc))
	return nil
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

var codeRE = regexp.MustCompile(`(?m)^\s+(\d{8})\s*$`)

func codeIn(t testing.TB, text string) string {
	t.Helper()
	m := codeRE.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no code in mail:\n%s", text)
	}
	return m[1]
}

// logBuffer collects log output for the secrecy checks.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// testLogger logs everything (debug included) into buf, and to the test
// output when verbose.
func testLogger(t testing.TB, buf *logBuffer) *slog.Logger {
	var w io.Writer = buf
	if testing.Verbose() {
		w = io.MultiWriter(buf, t.Output())
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func mockMailer(t testing.TB, m *mailtest.Mock) *SMTPMailer {
	t.Helper()
	mailer, err := NewSMTPMailer(SMTPConfig{Host: m.Host(), Port: m.Port(), TLS: TLSNone, HELO: "docstate.test", Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return mailer
}

type fixture struct {
	db   *kivik.DB
	devs *Devices
	logs *logBuffer
}

// newFixture builds Devices on a fresh database with test-friendly options;
// mod adjusts them.
func newFixture(t testing.TB, mailer Mailer, mod func(*Options)) fixture {
	t.Helper()
	return newFixtureOn(t, couchtest.Client(t), mailer, mod)
}

// newFixtureOn is newFixture through client (a front, say).
func newFixtureOn(t testing.TB, client *kivik.Client, mailer Mailer, mod func(*Options)) fixture {
	t.Helper()
	db := couchtest.NewDB(t, client)
	logs := &logBuffer{}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	opts := Options{Client: client, DB: db, Mailer: mailer, From: "docstate@example.test", Pairing: PairingControl,
		Secret: secret, CodeTTL: time.Minute, ResendInterval: time.Minute, Logger: testLogger(t, logs),
		HandlerTimeout: 5 * time.Second, Lease: 10 * time.Second}
	if mod != nil {
		mod(&opts)
	}
	devs, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return fixture{db: db, devs: devs, logs: logs}
}

// start runs an engine with the device handlers until the test ends or
// Stop. Its log goes to the fixture's buffer, which tests scan for secrets.
func (f fixture) start(t testing.TB, mod func(*workflow.Options)) *workflowtest.Running {
	t.Helper()
	reg := workflow.NewRegistry()
	if err := f.devs.Register(reg); err != nil {
		t.Fatal(err)
	}
	opts := workflowtest.Options(t)
	opts.Logger = f.devs.log
	if mod != nil {
		mod(&opts)
	}
	return workflowtest.Start(t, f.db, reg, opts)
}

func basicAuthStatus(t testing.TB, path, user, password string) int {
	t.Helper()
	opts := couchtest.Options(t)
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, opts.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth(user, password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// session returns the roles /_session reports for user:password.
func session(t testing.TB, user, password string) (string, []string) {
	t.Helper()
	opts := couchtest.Options(t)
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, opts.URL+"/_session", nil)
	req.SetBasicAuth(user, password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s struct {
		UserCtx struct {
			Name  string   `json:"name"`
			Roles []string `json:"roles"`
		} `json:"userCtx"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s.UserCtx.Name, s.UserCtx.Roles
}

// revisions returns the JSON of every revision of id the server still has.
func revisions(t testing.TB, db *kivik.DB, id string) []string {
	t.Helper()
	var info struct {
		RevsInfo []struct {
			Rev    string `json:"rev"`
			Status string `json:"status"`
		} `json:"_revs_info"`
	}
	if err := db.Get(context.Background(), id, kivik.Param("revs_info", true)).ScanDoc(&info); err != nil {
		t.Fatalf("revs_info %s: %v", id, err)
	}
	var out []string
	for _, ri := range info.RevsInfo {
		if ri.Status != "available" {
			continue
		}
		var raw json.RawMessage
		if err := db.Get(context.Background(), id, kivik.Rev(ri.Rev)).ScanDoc(&raw); err != nil {
			t.Fatalf("get %s rev %s: %v", id, ri.Rev, err)
		}
		out = append(out, string(raw))
	}
	if len(out) < 2 {
		t.Fatalf("only %d revisions of %s readable; the check would prove nothing", len(out), id)
	}
	return out
}

func readAll(t testing.TB, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// readBody returns the text/plain part of a received mail, decoded.
func readBody(t testing.TB, m *mail.Message) string {
	t.Helper()
	_, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(m.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if err != nil {
			t.Fatalf("no text/plain part: %v", err)
		}
		if strings.HasPrefix(p.Header.Get("Content-Type"), "text/plain") {
			var r io.Reader = p
			if p.Header.Get("Content-Transfer-Encoding") == "quoted-printable" {
				r = quotedprintable.NewReader(p)
			}
			b, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
	}
}

// settled waits until the engine is done with a document for now (no
// claim, a wake-up recorded) and returns its rev.
func settled(t testing.TB, db *kivik.DB, id string) any {
	t.Helper()
	var rev any
	workflowtest.Eventually(t, 10*time.Second, id+" settled", func() (bool, string) {
		doc := get(t, db, id)
		meta, _ := doc["docstate"].(map[string]any)
		rev = doc["_rev"]
		return meta != nil && meta["claim"] == nil && meta["wake_at"] != nil, mustJSON(meta)
	})
	return rev
}

func securityOf(m map[string]any) *kivik.Security {
	var s kivik.Security
	b, _ := json.Marshal(m)
	_ = json.Unmarshal(b, &s)
	return &s
}

// registerAndMail writes dv's registration, waits for it to reach
// confirming and for the one mail it sends, and returns that mail's body.
func registerAndMail(t testing.TB, f fixture, mock *mailtest.Mock, dv device) string {
	t.Helper()
	put(t, f.db, dv.doc())
	waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)
	mails := mock.WaitReceived(t, 1, 10*time.Second)
	if len(mails) != 1 {
		t.Fatalf("%d mails, want 1", len(mails))
	}
	return readBody(t, mails[0])
}
