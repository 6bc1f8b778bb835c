package couchtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// Environment variables that name the server tests use. The URL is the
// server root without credentials (couch.NewClient refuses those).
const (
	envURL      = "DOCSTATE_TEST_COUCHDB_URL"
	envUser     = "DOCSTATE_TEST_COUCHDB_USER"
	envPassword = "DOCSTATE_TEST_COUCHDB_PASSWORD"
)

// adminUser is the admin every server started here is configured with.
const adminUser = "admin"

const howTo = "call couchtest.Main(m) from TestMain, or run scripts/teststack start " +
	"and source .run/teststack/env"

// requestTimeout bounds the harness's own requests (create and delete a db).
const requestTimeout = 30 * time.Second

// Main runs the tests of a package against a real server. Use it as
//
//	func TestMain(m *testing.M) { couchtest.Main(m) }
//
// If DOCSTATE_TEST_COUCHDB_URL is set, the tests use that server. Otherwise
// Main starts one in-memory PouchDB Server for this test package, sets the
// three DOCSTATE_TEST_COUCHDB_* variables, runs the tests and stops the
// server. It exits the process with the tests' exit code.
//
// A missing installation is an error, never a skip: a test run that silently
// skipped every database test would look green and prove nothing.
func Main(m *testing.M) {
	if os.Getenv(envURL) != "" {
		os.Exit(m.Run())
	}

	dir, err := os.MkdirTemp("", "couchtest-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "couchtest: %v\n", err)
		os.Exit(1)
	}
	s, err := newServer(dir, ServerOptions{})
	if err == nil {
		err = s.startFresh()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, startErrorMessage(err))
		_ = os.RemoveAll(dir)
		os.Exit(1)
	}
	opts := s.Options()
	for k, v := range map[string]string{envURL: opts.URL, envUser: opts.Username, envPassword: opts.Password} {
		if err := os.Setenv(k, v); err != nil {
			fmt.Fprintf(os.Stderr, "couchtest: set %s: %v\n", k, err)
			_ = s.stop()
			_ = os.RemoveAll(dir)
			os.Exit(1)
		}
	}

	code := m.Run()

	// os.Exit skips deferred calls, so the server is stopped explicitly,
	// whatever the tests' outcome. (A panicking test never returns here; the
	// kernel then kills the server, see testproc.SysProcAttr.)
	if crash := s.unexpectedExit(); crash != "" {
		// PouchDB Server crashes on some requests (a non-admin PUT of a new
		// db, a _changes filter naming a missing design doc). Every later
		// test then fails with "connection refused"; say why.
		fmt.Fprintf(os.Stderr, "couchtest: PouchDB Server exited during the tests: %s\n", crash)
		// Tests that passed anyway did not notice their server was gone;
		// green would hide a request that crashes it.
		if code == 0 {
			code = 1
		}
	}
	if err := s.stop(); err != nil {
		fmt.Fprintf(os.Stderr, "couchtest: %v\n", err)
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// startErrorMessage turns a start failure into the text a developer acts on.
func startErrorMessage(err error) string {
	if errors.Is(err, errNotInstalled) {
		return "couchtest: PouchDB Server is not installed; run scripts/teststack install " +
			"(or set " + envURL + ")"
	}
	return "couchtest: " + err.Error()
}

// Options returns admin options for the server the tests use, from the
// DOCSTATE_TEST_COUCHDB_* variables.
func Options(tb testing.TB) couch.Options {
	tb.Helper()
	opts := couch.Options{
		URL:      os.Getenv(envURL),
		Username: os.Getenv(envUser),
		Password: os.Getenv(envPassword),
	}
	if opts.URL == "" {
		tb.Fatalf("couchtest: %s is not set; %s", envURL, howTo)
	}
	// The harness needs admin rights: PouchDB Server crashes when a
	// non-admin creates a database.
	if opts.Username == "" || opts.Password == "" {
		tb.Fatalf("couchtest: %s and %s must name an admin of %s; %s",
			envUser, envPassword, opts.URL, howTo)
	}
	return opts
}

// Client returns an admin client for the server the tests use. It is closed
// when the test ends.
func Client(tb testing.TB) *kivik.Client {
	tb.Helper()
	return newClient(tb, Options(tb))
}

func newClient(tb testing.TB, opts couch.Options) *kivik.Client {
	tb.Helper()
	c, err := couch.NewClient(opts)
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	tb.Cleanup(func() {
		// Close waits for requests in flight; a test that leaves a feed
		// running hangs here, which points at the leak.
		if err := c.Close(); err != nil {
			tb.Errorf("couchtest: close client: %v", err)
		}
	})
	return c
}

// NewDB creates a database with a name unique to this test and deletes it
// when the test ends. c must be an admin client: PouchDB Server crashes when
// a non-admin creates a database.
func NewDB(tb testing.TB, c *kivik.Client) *kivik.DB {
	tb.Helper()
	name, err := dbName(tb.Name())
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if err := c.CreateDB(ctx, name); err != nil {
		tb.Fatalf("couchtest: create database %q: %v", name, err)
	}
	tb.Cleanup(func() {
		// PouchDB Server 4.2.0 crashes (express-pouchdb routes/changes.js:62,
		// "complete.results" undefined) when a database is deleted while the
		// first, non-live query of a longpoll on it is still running: the
		// engines of the test have stopped, but a feed request they had just
		// sent is still being answered on the server. A short pause lets
		// such a query finish before the DELETE.
		time.Sleep(150 * time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
		defer cancel()
		var err error
		// A DELETE is not retried by net/http, so one sent on a pooled
		// connection to a server killed (and maybe restarted) since then
		// fails with EOF; a second try dials afresh.
		for range 3 {
			if err = c.DestroyDB(ctx, name); !noResponse(err) {
				break
			}
		}
		switch {
		case err == nil, couch.IsNotFound(err):
			// Gone, either way.
		case noResponse(err):
			// The test stopped the server (StartServer + Kill) and left it
			// stopped: the database went with it, or stays in a data dir
			// that is removed too. Not a failure of the test.
			tb.Logf("couchtest: delete database %q: server unreachable: %v", name, err)
		default:
			tb.Errorf("couchtest: delete database %q: %v", name, err)
		}
	})
	db := c.DB(name)
	if err := db.Err(); err != nil {
		tb.Fatalf("couchtest: open database %q: %v", name, err)
	}
	return db
}

// maxNameLen bounds the part of a db name taken from the test name; the
// whole name stays readable in logs and far below CouchDB's 238 characters.
const maxNameLen = 40

// dbName returns "t" + the sanitized test name + "-" + random hex, a valid
// CouchDB database name (^[a-z][a-z0-9_$()+/-]*$). Only [a-z0-9_-] are kept
// from the test name: "/" (from subtests) and "$()+" would need escaping in
// URLs, a classic source of bugs that do not belong to the test.
func dbName(testName string) (string, error) {
	var b strings.Builder
	lastUnderscore := false
	for _, r := range strings.ToLower(testName) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-':
			b.WriteRune(r)
			lastUnderscore = false
		case !lastUnderscore:
			b.WriteByte('_')
			lastUnderscore = true
		}
	}
	base := b.String()
	if len(base) > maxNameLen {
		base = base[:maxNameLen]
	}
	suffix, err := randomHex(6)
	if err != nil {
		return "", err
	}
	return "t" + base + "-" + suffix, nil
}

func randomHex(n int) (string, error) {
	buf := make([]byte, n)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("random bytes: %w", err)
	}
	return hex.EncodeToString(buf), nil
}

// noResponse reports whether a request failed without an HTTP answer: no
// server listened, or the connection broke. A timeout is not such a case; it
// stays an error.
func noResponse(err error) bool {
	var urlErr *url.Error
	return err != nil && errors.As(err, &urlErr) &&
		!errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled)
}
