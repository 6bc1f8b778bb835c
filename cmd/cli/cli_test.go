package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

// jobs moves job documents new → done.
var jobs = handlers.Func{SetName: "jobs", Fn: func(reg *workflow.Registry) error {
	return reg.Register(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(context.Context, *workflow.Doc) (workflow.Result, error) {
			return workflow.Transition("done"), nil
		})})
}}

// writeConfig writes a config file for the test server and database.
func writeConfig(t *testing.T, db, extra string) string {
	t.Helper()
	o := couchtest.Options(t)
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte(o.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "docstate.yaml")
	cfg := fmt.Sprintf("couchdb:\n  url: %s\n  username: %s\n  password_file: %s\ndatabase: %s\n%s", o.URL, o.Username, pw, db, extra)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestRunProcessesDocsServesHealthAndDrainsOnCancel(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	addr := freeAddr(t)
	path := writeConfig(t, db.Name(), "engine:\n  checkpoint_interval: 100ms\nhttp:\n  listen: "+addr+"\n")
	ctx := context.Background()
	for i := range 20 {
		if _, err := db.Put(ctx, fmt.Sprintf("j%02d", i), map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	var stderr bytes.Buffer
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil },
		Stderr:  &stderr,
		Environ: []string{},
	})
	root.SetArgs([]string{"run", "--config", path, "--set", "engine.workers=4"})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(runCtx) }()
	defer func() { cancel(); <-done }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		var doc struct{ State string }
		_ = db.Get(ctx, "j19").ScanDoc(&doc)
		resp, err := http.Get("http://" + addr + "/readyz")
		ready := err == nil && resp.StatusCode == http.StatusOK
		if resp != nil {
			resp.Body.Close()
		}
		if doc.State == "done" && ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %q ready %v; stderr:\n%s", doc.State, ready, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The counters move as documents flow.
	before := scrape(addr, `docstate_transitions_total{engine="docstate"}`)
	for i := range 10 {
		if _, err := db.Put(ctx, fmt.Sprintf("k%02d", i), map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	deadline = time.Now().Add(30 * time.Second)
	for scrape(addr, `docstate_transitions_total{engine="docstate"}`) < before+10 {
		if time.Now().After(deadline) {
			t.Fatalf("transitions did not move by 10 from %v", before)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if runs := scrape(addr, `docstate_handler_runs_total{engine="docstate",mode="safe",result="ok",state="new",type="job"}`); runs < 30 {
		t.Fatalf("handler runs %v, want >= 30", runs)
	}
	if ready := scrape(addr, `docstate_ready{engine="docstate"}`); ready != 1 {
		t.Fatalf("docstate_ready %v", ready)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not stop after cancel")
	}
	done <- nil
	for _, want := range []string{"docstate starting", "engine stopped", "docstate stopped"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, stderr.String())
		}
	}
	if strings.Contains(stderr.String(), couchtest.Options(t).Password) {
		t.Fatal("the password appears in the log")
	}
}

func TestCheckReportsEachProblemAndFails(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	tests := []struct {
		name  string
		extra string
		db    string
		want  []string
		ok    bool
	}{
		{name: "good", db: db.Name(), want: []string{"config: ok", "couchdb: ok", "handlers: ok (1 registered)", "job"}, ok: true},
		{name: "unknown key", db: db.Name(), extra: "engine:\n  wrokers: 3\n", want: []string{`unknown key "engine.wrokers"`}},
		{name: "missing database", db: "no-such-db", want: []string{`database: FAIL: "no-such-db" does not exist`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			root := cli.NewRoot(cli.Options{
				Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil },
				Stdout:  &out,
				Stderr:  &out,
				Environ: []string{},
			})
			root.SetArgs([]string{"check", "--config", writeConfig(t, tt.db, tt.extra)})
			err := root.ExecuteContext(context.Background())
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok=%v; output:\n%s", err, tt.ok, out.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
}

func TestCheckUnreachableServerAndWrongPassword(t *testing.T) {
	var out bytes.Buffer
	root := cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}})
	root.SetArgs([]string{"check", "--set", "couchdb.url=http://" + freeAddr(t)})
	if err := root.ExecuteContext(context.Background()); err == nil || !strings.Contains(out.String(), "cannot reach") {
		t.Fatalf("unreachable: err %v output:\n%s", err, out.String())
	}
	out.Reset()
	root = cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}})
	root.SetArgs([]string{"check", "--set", "couchdb.url=ftp://admin:hunter2@127.0.0.1"})
	if err := root.ExecuteContext(context.Background()); err == nil || !strings.Contains(out.String(), "couchdb.url:") ||
		strings.Contains(out.String(), "hunter2") {
		t.Fatalf("bad url: err %v, output (must name couchdb.url, must not echo the password):\n%s", err, out.String())
	}
	o := couchtest.Options(t)
	out.Reset()
	root = cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}})
	root.SetArgs([]string{"check", "--set", "couchdb.url=" + o.URL, "--set", "couchdb.username=" + o.Username, "--set", "couchdb.password=wrong"})
	if err := root.ExecuteContext(context.Background()); err == nil || strings.Contains(out.String(), "wrong") ||
		!strings.Contains(out.String(), `refused the credentials of user "admin"`) {
		t.Fatalf("wrong password: err %v, output (must fail, must not echo the password):\n%s", err, out.String())
	}
}

// scrape reads one series' value from /metrics: -1 while the daemon does
// not answer or lacks the series.
func scrape(addr, series string) float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				return f
			}
		}
	}
	return -1
}

// run on a database that does not exist says so and stops, instead of
// waiting and logging "database was re-created" once a second.
func TestRunOnMissingDatabaseSaysSo(t *testing.T) {
	name := "docstate-missing-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	path := writeConfig(t, name, "")
	var stderr bytes.Buffer
	root := cli.NewRoot(cli.Options{
		Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil },
		Stderr:  &stderr,
		Environ: []string{},
	})
	root.SetArgs([]string{"run", "--config", path})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := root.ExecuteContext(ctx)
	if ctx.Err() != nil {
		t.Fatalf("run still waiting on a missing database after 20s; log:\n%s", stderr.String())
	}
	want := "database " + name + " does not exist"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("run returned %v, want an error saying %q; log:\n%s", err, want, stderr.String())
	}
	if strings.Contains(stderr.String(), "re-created") {
		t.Fatalf("the log speaks of a re-created database:\n%s", stderr.String())
	}
}
