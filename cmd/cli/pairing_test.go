package cli_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/devicetest"
	"github.com/docstate/docstate/internal/mailtest"
)

// docstate run with devices.pairing users, configured from a file: a real
// PouchDB device signs up as its own user, reads its code from the mail
// sink, confirms on its own user document, and replicates its owner's
// control database; the daemon's readiness covers the _users follower.
func TestRunPairsADeviceThroughItsOwnUser(t *testing.T) {
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	ctx := context.Background()
	d := startPairingDaemon(t, db.Name(), "")
	defer d.stop()
	server, mail, addr, public := d.server, d.mail, d.addr, d.public
	stderr := d.stderr

	b := make([]byte, 8)
	_, _ = rand.Read(b)
	owner := "cli-" + hex.EncodeToString(b) + "@example.test"
	dev, user, password, url := pairThroughUser(t, server, mail, owner, "CLI phone", stderr)
	remote := devicetest.Remote{URL: url, User: user, Password: password}
	if err := dev.Replicate(ctx, "control", remote, "pull"); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.WaitFor(ctx, "control", devices.TrustedID(user), map[string]any{"state": "active"}, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The private listener has health and metrics, the public one only
	// the confirmation page; readiness names its checks.
	for _, c := range []struct {
		url  string
		want int
		body string
	}{
		{"http://" + addr + "/readyz?verbose", 200, "[+] feed ok\n[+] devices ok\nready\n"},
		{"http://" + addr + "/metrics", 200, ""},
		{"http://" + addr + "/devices/confirm", 404, "404 page not found\n"},
		{"http://" + public + "/devices/confirm", 404, "Link not valid"}, // the page, without a link's parameters
		{"http://" + public + "/metrics", 404, "404 page not found\n"},
		{"http://" + public + "/readyz", 404, "404 page not found\n"},
	} {
		resp, err := http.Get(c.url)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.want || !strings.Contains(string(b), c.body) {
			t.Errorf("%s: %d %q, want %d %q", c.url, resp.StatusCode, b, c.want, c.body)
		}
	}
	_ = admin.DestroyDB(ctx, devices.UserDBName(owner))
}

// pairingDaemon is a `docstate run` with devices.pairing users, its mail
// sink and its listeners, for tests that pair real devices with it.
type pairingDaemon struct {
	server       string // the CouchDB server's URL
	addr, public string // the private and public listeners
	mail         *mailtest.Maildev
	stderr       *bytes.Buffer
	stop         func() // stops the daemon and reports its error; call before removing its databases
}

// startPairingDaemon starts `docstate run` on control database db with
// devices.pairing users and a fresh secret, mail sink and listeners;
// extra is appended to its configuration (it may use %[1]s for the
// server's URL).
func startPairingDaemon(t *testing.T, db, extra string) *pairingDaemon {
	t.Helper()
	d := &pairingDaemon{server: couchtest.Options(t).URL, addr: freeAddr(t), public: freeAddr(t),
		mail: mailtest.StartMaildev(t, mailtest.MaildevOptions{}), stderr: new(bytes.Buffer)}
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("s", 40)), 0o600); err != nil {
		t.Fatal(err)
	}
	if extra != "" {
		extra = fmt.Sprintf(extra, d.server)
	}
	path := writeConfig(t, db, fmt.Sprintf("http:\n  listen: %s\n  public_listen: %s\nsmtp:\n  host: 127.0.0.1\n  port: %d\n  tls: none\n  from: docstate@example.test\n"+
		"devices:\n  enabled: true\n  secret_file: %s\n  pairing: users\n  public_url: %s\n  heal_interval: 1s\n  base_url: http://%s\n",
		d.addr, d.public, d.mail.SMTPPort(), secret, d.server, d.public)+extra)
	root := cli.NewRoot(cli.Options{Stderr: d.stderr, Environ: []string{}})
	root.SetArgs([]string{"run", "--config", path})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	var once sync.Once
	d.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v\n%s", err, d.stderr.String())
			}
		})
	}
	t.Cleanup(d.stop) // a test that fails early still waits for the daemon
	return d
}

// pairThroughUser pairs a new real PouchDB device of owner with the
// running daemon, as a device does: it signs up as its own CouchDB user,
// reads its code from the mail sink, confirms on its own user document
// and waits for its control database's URL. stderr is the daemon's, shown
// when it never gets there.
func pairThroughUser(t *testing.T, server string, mail *mailtest.Maildev, owner, name string, stderr *bytes.Buffer) (dev *devicetest.Device, user, password, controlURL string) {
	t.Helper()
	ctx := context.Background()
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	user, password = "dev-"+hex.EncodeToString(b), hex.EncodeToString(b)+"-pw"
	dev = devicetest.Start(t)
	res, err := dev.SignUp(ctx, server, user, password, map[string]any{
		"state": devices.UserState, devices.FieldPairing: map[string]any{"owner": owner, "device_name": name}})
	if err != nil || res.Status != 201 {
		t.Fatalf("sign up: %v %d %s", err, res.Status, res.Body)
	}
	code := ""
	deadline := time.Now().Add(30 * time.Second)
	for code == "" {
		if time.Now().After(deadline) {
			t.Fatalf("no mail to %s; stderr:\n%s", owner, stderr.String())
		}
		emails, _ := mail.Emails(ctx)
		for _, m := range emails {
			if len(m.To) > 0 && m.To[0].Address == owner {
				if c := regexp.MustCompile(`(?m)^\s+(\d{8})\s*$`).FindStringSubmatch(m.Text); c != nil {
					code = c[1]
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	userURL := server + "/_users/org.couchdb.user:" + user
	status := func() map[string]any {
		r, err := dev.HTTP(ctx, "GET", userURL, user, password, nil)
		if err != nil || r.Status != 200 {
			t.Fatalf("own user: %v %d", err, r.Status)
		}
		var doc map[string]any
		_ = json.Unmarshal(r.Body, &doc)
		return doc
	}
	for {
		doc := status()
		if st, _ := doc[devices.FieldPairingStatus].(map[string]any); st["state"] == "confirming" {
			doc[devices.FieldPairing].(map[string]any)["confirm_attempt"] = code
			doc["password"] = password
			if r, err := dev.HTTP(ctx, "PUT", userURL, user, password, doc); err == nil && r.Status == 201 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("never confirming: %v", doc[devices.FieldPairingStatus])
		}
		time.Sleep(100 * time.Millisecond)
	}
	var url string
	for url == "" {
		if st, _ := status()[devices.FieldPairingStatus].(map[string]any); st["state"] == "active" {
			url, _ = st[devices.FieldControlURL].(string)
		}
		if time.Now().After(deadline) {
			t.Fatalf("never active; stderr:\n%s", stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return dev, user, password, url
}
