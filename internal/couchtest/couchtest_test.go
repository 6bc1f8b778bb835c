package couchtest_test

import (
	"context"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

func ctx(t *testing.T) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// validDBName is CouchDB's rule for database names.
var validDBName = regexp.MustCompile(`^[a-z][a-z0-9_$()+/-]*$`)

func TestNewDBIsUsableAndRemovedAfterTheTest(t *testing.T) {
	t.Parallel()
	c := couchtest.Client(t)

	var names []string
	// Odd characters and upper case in the test name must still give a
	// valid database name.
	t.Run("Sub Test/With ÄÖ$(+) Chars", func(t *testing.T) {
		db := couchtest.NewDB(t, c)
		other := couchtest.NewDB(t, c)
		names = append(names, db.Name(), other.Name())

		if db.Name() == other.Name() {
			t.Fatalf("two NewDB calls gave the same name %q", db.Name())
		}
		for _, name := range names {
			if !validDBName.MatchString(name) {
				t.Errorf("db name %q is not a valid CouchDB database name", name)
			}
			if !strings.HasPrefix(name, "ttestnewdb") {
				t.Errorf("db name %q does not start with the test name", name)
			}
		}

		rev, err := db.Put(ctx(t), "doc1", map[string]any{"n": 1})
		if err != nil {
			t.Fatalf("put: %v", err)
		}
		var got struct {
			Rev string `json:"_rev"`
			N   int    `json:"n"`
		}
		if err := db.Get(ctx(t), "doc1").ScanDoc(&got); err != nil {
			t.Fatalf("get: %v", err)
		}
		if got.Rev != rev || got.N != 1 {
			t.Fatalf("get = %+v, want rev %s and n 1", got, rev)
		}
	})
	if len(names) != 2 {
		t.Fatal("sub-test did not create its databases")
	}
	for _, name := range names {
		exists, err := c.DBExists(ctx(t), name)
		if err != nil {
			t.Fatalf("DBExists(%q): %v", name, err)
		}
		if exists {
			t.Errorf("database %q still exists after its test ended", name)
		}
	}
}

func TestServerIsNotAdminParty(t *testing.T) {
	t.Parallel()
	opts := couchtest.Options(t)

	admin := couchtest.Client(t)
	session, err := admin.Session(ctx(t))
	if err != nil {
		t.Fatalf("admin session: %v", err)
	}
	if !slices.Contains(session.Roles, "_admin") {
		t.Fatalf("admin session roles = %v, want _admin", session.Roles)
	}

	anon, err := couch.NewClient(couch.Options{URL: opts.URL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = anon.Close() })
	session, err = anon.Session(ctx(t))
	if err != nil {
		t.Fatalf("anonymous session: %v", err)
	}
	// In admin party every request, anonymous ones included, is _admin.
	if session.Name != "" || slices.Contains(session.Roles, "_admin") {
		t.Fatalf("anonymous session = name %q roles %v: server runs as admin party", session.Name, session.Roles)
	}

	// Server config is admin-only. (An anonymous PUT of a new database would
	// be the obvious probe, but it crashes PouchDB Server.)
	for _, tc := range []struct {
		name           string
		user, password string
	}{
		{"anonymous", "", ""},
		{"wrong password", opts.Username, opts.Password + "x"},
	} {
		req, err := http.NewRequestWithContext(ctx(t), http.MethodGet, opts.URL+"/_config", nil)
		if err != nil {
			t.Fatal(err)
		}
		if tc.user != "" {
			req.SetBasicAuth(tc.user, tc.password)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s GET /_config: %v", tc.name, err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s GET /_config = %s, want 401", tc.name, resp.Status)
		}
	}
}

type doc struct {
	Value string `json:"value"`
}

func TestOnDiskServerKeepsDataAcrossKill(t *testing.T) {
	t.Parallel()
	s := couchtest.StartServer(t, couchtest.ServerOptions{OnDisk: true})
	url := s.URL()
	c := s.Client(t)
	db := couchtest.NewDB(t, c)
	if _, err := db.Put(ctx(t), "survivor", doc{Value: "kept"}); err != nil {
		t.Fatalf("put: %v", err)
	}

	s.Kill(t)
	if _, err := c.Version(ctx(t)); err == nil {
		t.Fatal("server still answers after Kill")
	}

	s.Start(t)
	if s.URL() != url {
		t.Fatalf("URL after restart = %s, want %s", s.URL(), url)
	}
	// The client from before the restart keeps working: same port, same
	// admin password.
	var got doc
	if err := db.Get(ctx(t), "survivor").ScanDoc(&got); err != nil {
		t.Fatalf("get after restart: %v", err)
	}
	if got.Value != "kept" {
		t.Fatalf("doc after restart = %+v, want value kept", got)
	}
}

func TestInMemoryServerRestartsEmptyOnSamePort(t *testing.T) {
	t.Parallel()
	s := couchtest.StartServer(t, couchtest.ServerOptions{})
	url := s.URL()
	c := s.Client(t)
	db := couchtest.NewDB(t, c)

	s.Kill(t)
	s.Start(t)
	if s.URL() != url {
		t.Fatalf("URL after restart = %s, want %s", s.URL(), url)
	}
	exists, err := c.DBExists(ctx(t), db.Name())
	if err != nil {
		t.Fatalf("DBExists after restart: %v", err)
	}
	if exists {
		t.Fatal("in-memory database survived a kill")
	}
	// Still an admin after the restart: the config is rewritten each start.
	if err := c.CreateDB(ctx(t), db.Name()); err != nil {
		t.Fatalf("create db after restart: %v", err)
	}
}

func TestServerKilledAndLeftStoppedCleansUp(t *testing.T) {
	t.Parallel()
	s := couchtest.StartServer(t, couchtest.ServerOptions{})
	couchtest.NewDB(t, s.Client(t))
	// Left dead: NewDB's cleanup cannot delete the database and must not
	// fail the test for it; the server's cleanup must cope with a dead one.
	s.Kill(t)
}
