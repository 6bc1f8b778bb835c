package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
)

// checkJSON is check -o json as a script reads it.
type checkJSON struct {
	OK     bool `json:"ok"`
	Checks []struct {
		Name, Status, Message string
	} `json:"checks"`
	Handlers []struct{ Type, State, Mode string } `json:"handlers"`
}

func (c checkJSON) status(name string) string {
	for _, ch := range c.Checks {
		if ch.Name == name {
			return ch.Status + ": " + ch.Message
		}
	}
	return "absent"
}

func parseCheck(t *testing.T, out string) checkJSON {
	t.Helper()
	var c checkJSON
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatalf("check -o json printed no JSON: %v\n%s", err, out)
	}
	return c
}

// TestCheckWarnsOnNoHandlersAndBindsListen: a daemon without handlers
// would run and do nothing (a warning, exit 0); an http.listen address
// already taken would make run fail (a failure, exit 1).
func TestCheckWarnsOnNoHandlersAndBindsListen(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	free := freeAddr(t)
	out, err := execute(t, nil, "check", "--config", writeConfig(t, db.Name(), "http:\n  listen: "+free+"\n"))
	if err != nil || !strings.Contains(out, "handlers: warning: 0 registered") ||
		!strings.Contains(out, "http: ok ("+free+" can be bound)") {
		t.Fatalf("no handlers: err %v, want a warning and exit 0:\n%s", err, out)
	}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg := writeConfig(t, db.Name(), "http:\n  listen: "+taken.Addr().String()+"\n")
	out, err = executeStdout(t, []handlers.Set{jobs}, "check", "--config", cfg, "--json")
	c := parseCheck(t, out)
	if err == nil || c.OK || !strings.HasPrefix(c.status("http"), "fail: cannot listen on "+taken.Addr().String()) ||
		c.status("handlers") != "ok: 1 registered" || len(c.Handlers) != 1 || c.Handlers[0].Mode != "safe" {
		t.Fatalf("taken http.listen: err %v %+v\n%s", err, c, out)
	}
}

// TestCheckAdminRightsAndSMTPSession runs check with devices.enabled, the
// built-in set that needs a server admin and a mail relay: a plain user is
// reported, and the SMTP session is opened for real against maildev with
// AUTH, so a wrong password or a relay without STARTTLS under the default
// tls: mandatory fails the check.
func TestCheckAdminRightsAndSMTPSession(t *testing.T) {
	client := couchtest.Client(t)
	db := couchtest.NewDB(t, client)
	ctx := context.Background()
	mail := mailtest.StartMaildev(t, mailtest.MaildevOptions{User: "relay", Password: "s3cret-relay"})

	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("k", 40)), 0o600); err != nil {
		t.Fatal(err)
	}
	devicesCfg := func(tls, password string) string {
		return fmt.Sprintf("devices:\n  enabled: true\n  secret_file: %s\nsmtp:\n  host: 127.0.0.1\n  port: %d\n  tls: %s\n"+
			"  from: docstate@example.test\n  username: relay\n  password: %s\n", secret, mail.SMTPPort(), tls, password)
	}

	out, err := builtin(t, true, "check", "--config", writeConfig(t, db.Name(), devicesCfg("none", "s3cret-relay")), "-o", "json")
	c := parseCheck(t, out)
	if err != nil || !c.OK || !strings.HasPrefix(c.status("admin"), "ok: ") || !strings.HasPrefix(c.status("handlers"), "ok: ") ||
		!strings.Contains(c.status("smtp"), `ok: 127.0.0.1:`) || !strings.Contains(c.status("smtp"), `AUTH as "relay"`) {
		t.Fatalf("good devices config: err %v\n%s", err, out)
	}

	out, err = builtin(t, false, "check", "--config", writeConfig(t, db.Name(), devicesCfg("none", "wrong")))
	if err == nil || !strings.Contains(out, "smtp: FAIL: ") || strings.Contains(out, "wrong") {
		t.Fatalf("wrong SMTP password: err %v (want a failure that does not echo the password)\n%s", err, out)
	}
	t.Logf("wrong SMTP password:\n%s", out)
	out, err = builtin(t, false, "check", "--config", writeConfig(t, db.Name(), devicesCfg("mandatory", "s3cret-relay")))
	if err == nil || !strings.Contains(out, "smtp: FAIL: ") || !strings.Contains(strings.ToLower(out), "tls") {
		t.Fatalf("relay without STARTTLS under tls mandatory: err %v\n%s", err, out)
	}

	t.Logf("no STARTTLS:\n%s", out)

	// A user that is not a server admin.
	if _, err := client.DB("_users").Put(ctx, "org.couchdb.user:plain", map[string]any{
		"name": "plain", "password": "plain-pw", "roles": []string{}, "type": "user"}); err != nil {
		t.Fatal(err)
	}
	o := couchtest.Options(t)
	out, err = builtin(t, false, "check", "--config", writeConfig(t, db.Name(), devicesCfg("none", "s3cret-relay")),
		"--set", "couchdb.username=plain", "--set", "couchdb.password=plain-pw", "--set", "couchdb.password_file=")
	if err == nil || !strings.Contains(out, `admin: FAIL: user "plain" is not a server admin`) ||
		!strings.Contains(out, "devices.enabled") {
		t.Fatalf("non-admin user with devices on (server %s): err %v\n%s", o.URL, err, out)
	}
	t.Logf("not an admin:\n%s", out)
}

// builtin runs the command line with the built-in handler sets (those the
// config enables) and returns stdout, or with both stdout and stderr.
func builtin(t *testing.T, stdoutOnly bool, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	opts := cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}}
	if stdoutOnly {
		opts.Stderr = &errOut
	}
	root := cli.NewRoot(opts)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if errOut.Len() > 0 {
		t.Logf("stderr: %s", errOut.String())
	}
	return out.String(), err
}

// TestCheckFindsMissingTemplates: a channel template whose database does
// not exist is a warning naming it; existing ones are counted.
func TestCheckFindsMissingTemplates(t *testing.T) {
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	tmpl := couchtest.NewDB(t, admin)
	cfg := writeConfig(t, db.Name(), fmt.Sprintf("channels:\n  enabled: true\n  templates: \"starter=%s,gone=%s-missing\"\n", tmpl.Name(), tmpl.Name()))
	out, _ := executeStdout(t, nil, "check", "--config", cfg, "--json")
	c := parseCheck(t, out)
	if got := c.status("templates"); !strings.HasPrefix(got, "warn: template databases missing: gone="+tmpl.Name()+"-missing") {
		t.Fatalf("templates: %s\n%s", got, out)
	}
	cfg = writeConfig(t, db.Name(), fmt.Sprintf("channels:\n  enabled: true\n  templates: \"starter=%s\"\n", tmpl.Name()))
	out, _ = executeStdout(t, nil, "check", "--config", cfg, "--json")
	if got := parseCheck(t, out).status("templates"); got != "ok: 1 template databases found" {
		t.Fatalf("templates: %s\n%s", got, out)
	}
}
