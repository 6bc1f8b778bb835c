package config_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/docstate/docstate/config"
)

func TestLoadPrecedence(t *testing.T) {
	const file = "database: fromfile\nengine:\n  workers: 2\n  max_attempts: 7\n"
	tests := []struct {
		name         string
		file         string // "" = no file
		env          []string
		overrides    map[string]string
		wantWorkers  int
		wantAttempts int
		wantDatabase string
	}{
		{
			name:         "defaults only",
			wantWorkers:  16,
			wantAttempts: 5,
			wantDatabase: "docstate",
		},
		{
			name:         "file over defaults",
			file:         file,
			wantWorkers:  2,
			wantAttempts: 7,
			wantDatabase: "fromfile",
		},
		{
			name:         "env over file",
			file:         file,
			env:          []string{"DOCSTATE_ENGINE_WORKERS=3", "DOCSTATE_DATABASE=fromenv"},
			wantWorkers:  3,
			wantAttempts: 7,
			wantDatabase: "fromenv",
		},
		{
			name:         "override over env and file",
			file:         file,
			env:          []string{"DOCSTATE_ENGINE_WORKERS=3", "DOCSTATE_DATABASE=fromenv"},
			overrides:    map[string]string{"engine.workers": "4"},
			wantWorkers:  4,
			wantAttempts: 7,
			wantDatabase: "fromenv",
		},
		{
			name:         "override over file",
			file:         file,
			overrides:    map[string]string{"engine.max_attempts": "9"},
			wantWorkers:  2,
			wantAttempts: 9,
			wantDatabase: "fromfile",
		},
		{
			name:         "env without file",
			env:          []string{"DOCSTATE_ENGINE_MAX_ATTEMPTS=8"},
			wantWorkers:  16,
			wantAttempts: 8,
			wantDatabase: "docstate",
		},
		{
			name:         "later env duplicate wins",
			env:          []string{"DOCSTATE_ENGINE_WORKERS=3", "DOCSTATE_ENGINE_WORKERS=5"},
			wantWorkers:  5,
			wantAttempts: 5,
			wantDatabase: "docstate",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := ""
			if tt.file != "" {
				path = writeConfig(t, tt.file)
			}
			got, err := config.Load(path, tt.env, tt.overrides)
			if err != nil {
				t.Fatalf("Load() = %v", err)
			}
			if got.Engine.Workers != tt.wantWorkers || got.Engine.MaxAttempts != tt.wantAttempts ||
				got.Database != tt.wantDatabase {
				t.Errorf("workers, max_attempts, database = %d, %d, %q; want %d, %d, %q",
					got.Engine.Workers, got.Engine.MaxAttempts, got.Database,
					tt.wantWorkers, tt.wantAttempts, tt.wantDatabase)
			}
		})
	}
}

func TestLoadAllTypes(t *testing.T) {
	path := writeConfig(t, `
couchdb:
  url: https://couch.example.com:6984
  max_connections: 8
engine:
  owner: "node-1"
  lease: 90s
  full_resync_on_start: false
  checkpoint_interval: 250ms
log:
  format: json
http:
  listen: ""
`)
	got, err := config.Load(path, nil, nil)
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	want := config.Default()
	want.CouchDB.URL = "https://couch.example.com:6984"
	want.CouchDB.MaxConnections = 8
	want.Engine.Owner = "node-1"
	want.Engine.Lease = 90_000_000_000
	want.Engine.FullResyncOnStart = false
	want.Engine.CheckpointInterval = 250_000_000
	want.Log.Format = "json"
	want.HTTP.Listen = ""
	if got != want {
		t.Errorf("Load() =\n%+v\nwant\n%+v", got, want)
	}
}

// TestLoadScalarsAreLiteral checks that string keys get the text as
// written, not YAML's reading of it (0123 is not the number 83, :9090 is
// not a mapping).
func TestLoadScalarsAreLiteral(t *testing.T) {
	path := writeConfig(t, `
couchdb:
  username: 1e3
  password: 0123
engine:
  owner: true
http:
  listen: :9090
`)
	got, err := config.Load(path, nil, nil)
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	if got.CouchDB.Username != "1e3" || got.CouchDB.Password != "0123" ||
		got.Engine.Owner != "true" || got.HTTP.Listen != ":9090" {
		t.Errorf("Load() = %+v", got)
	}
}

func TestLoadTrivialFiles(t *testing.T) {
	tests := []struct {
		name    string
		content string
	}{
		{"empty", ""},
		{"comments only", "# nothing configured yet\n"},
		{"document marker", "---\n"},
		{"null document", "~\n"},
		{"null section", "engine:\n"},
		{"null value keeps default", "engine:\n  workers:\n  lease: ~\n"},
		{"explicit document end", "---\nengine:\n  workers: 16\n...\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := config.Load(writeConfig(t, tt.content), nil, nil)
			if err != nil {
				t.Fatalf("Load() = %v", err)
			}
			if got != config.Default() {
				t.Errorf("Load() = %+v, want Default()", got)
			}
		})
	}
}

func TestLoadAliases(t *testing.T) {
	path := writeConfig(t, `
engine:
  retry_base: &short 2s
  handler_timeout: *short
log: &log
  level: debug
`)
	got, err := config.Load(path, nil, nil)
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	if got.Engine.HandlerTimeout != got.Engine.RetryBase || got.Engine.RetryBase.String() != "2s" ||
		got.Log.Level != "debug" {
		t.Errorf("Load() engine, log = %+v, %+v", got.Engine, got.Log)
	}
}

// TestLoadFileErrors checks that every file problem names the line and the
// dotted key. Each want is a substring after the file path.
func TestLoadFileErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []string
	}{
		{
			name: "unknown key with line",
			content: "couchdb:\n  url: http://127.0.0.1:5984\n\n" +
				"engine:\n  workers: 4\n  lease: 2m\n  wrokers: 5\n",
			want: []string{`config.yaml:7: unknown key "engine.wrokers" (did you mean "engine.workers"?)`},
		},
		{
			name:    "unknown section",
			content: "engin:\n  workers: 4\n",
			want:    []string{`config.yaml:1: unknown key "engin" (did you mean "engine"?)`},
		},
		{
			name:    "key in the wrong section",
			content: "couchdb:\n  workers: 4\n",
			want:    []string{`config.yaml:2: unknown key "couchdb.workers" (did you mean "engine.workers"?)`},
		},
		{
			name:    "unknown key without suggestion",
			content: "colour: blue\n",
			want:    []string{`config.yaml:1: unknown key "colour"`},
		},
		{
			name:    "key case matters",
			content: "Database: docs\n",
			want:    []string{`config.yaml:1: unknown key "Database" (did you mean "database"?)`},
		},
		{
			name:    "dotted key",
			content: "engine.workers: 4\n",
			want:    []string{`config.yaml:1: unknown key "engine.workers" (nest keys as mappings instead of writing dots)`},
		},
		{
			name:    "wrong type",
			content: "engine:\n  workers: lots\n",
			want:    []string{`config.yaml:2: engine.workers: invalid integer "lots": invalid syntax`},
		},
		{
			name:    "integer out of range",
			content: "engine:\n  workers: 99999999999999999999\n",
			want:    []string{`config.yaml:2: engine.workers: invalid integer "99999999999999999999": value out of range`},
		},
		{
			name:    "float for integer",
			content: "engine:\n  feed_batch: 1.5\n",
			want:    []string{`config.yaml:2: engine.feed_batch: invalid integer "1.5"`},
		},
		{
			name:    "YAML 1.1 boolean",
			content: "engine:\n  full_resync_on_start: yes\n",
			want:    []string{`config.yaml:2: engine.full_resync_on_start: invalid boolean "yes", want true or false`},
		},
		{
			name:    "duration without unit",
			content: "engine:\n  lease: 30\n",
			want:    []string{`config.yaml:2: engine.lease: invalid duration "30", want a number with a unit such as "30s", "2m" or "1h"`},
		},
		{
			name:    "bad duration",
			content: "engine:\n  handler_timeout: soon\n",
			want:    []string{`config.yaml:2: engine.handler_timeout: invalid duration "soon"`},
		},
		{
			name:    "list for a value",
			content: "engine:\n  workers: [1, 2]\n",
			want:    []string{`config.yaml:2: engine.workers: must be a single value, got a list`},
		},
		{
			name:    "mapping for a value",
			content: "database:\n  name: docs\n",
			want:    []string{`config.yaml:1: database: must be a single value, got a mapping`},
		},
		{
			name:    "value for a section",
			content: "engine: 5\n",
			want:    []string{`config.yaml:1: engine: must be a mapping of keys, got a single value`},
		},
		{
			name:    "top level list",
			content: "- engine\n",
			want:    []string{`config.yaml:1: the top level must be a mapping of keys, got a list`},
		},
		{
			name:    "duplicate key",
			content: "engine:\n  workers: 4\n  workers: 5\n",
			want:    []string{`config.yaml:3: duplicate key "engine.workers" (first set on line 2)`},
		},
		{
			name:    "duplicate section",
			content: "engine:\n  workers: 4\nengine:\n  lease: 3m\n",
			want:    []string{`config.yaml:3: duplicate key "engine" (first set on line 1)`},
		},
		{
			name:    "multiple documents",
			content: "engine:\n  workers: 4\n---\nengine:\n  workers: 5\n",
			want:    []string{`config.yaml:3: multiple YAML documents; a config file holds exactly one`},
		},
		{
			name:    "merge key",
			content: "base: &b\n  workers: 4\nengine:\n  <<: *b\n",
			want:    []string{`config.yaml:1: unknown key "base"`, `config.yaml:4: merge keys (<<) are not supported`},
		},
		{
			name:    "syntax error",
			content: "engine:\n  workers: 4\n lease: 2m\n",
			// The line is yaml.v3's, which points at the context of the
			// error rather than the stray line.
			want: []string{`config.yaml:2: invalid YAML: did not find expected key`},
		},
		{
			name:    "tab indentation",
			content: "engine:\n\tworkers: 4\n",
			want:    []string{`config.yaml:2: invalid YAML: found character that cannot start any token`},
		},
		{
			name: "several problems at once",
			content: "engine:\n  wrokers: 4\n  lease: forever\n" +
				"log:\n  levle: debug\n",
			want: []string{
				`config.yaml:2: unknown key "engine.wrokers" (did you mean "engine.workers"?)`,
				`config.yaml:3: engine.lease: invalid duration "forever"`,
				`config.yaml:5: unknown key "log.levle" (did you mean "log.level"?)`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, tt.content)
			_, err := config.Load(path, nil, nil)
			if err == nil {
				t.Fatalf("Load() = nil error, want %q", tt.want)
			}
			lines := errorLines(err)
			if len(lines) != len(tt.want) {
				t.Fatalf("Load() gave %d errors, want %d:\n%v", len(lines), len(tt.want), err)
			}
			for i, want := range tt.want {
				if !strings.HasPrefix(lines[i], filepath.Dir(path)+string(filepath.Separator)) ||
					!strings.Contains(lines[i], want) {
					t.Errorf("error %d = %q, want the path and %q", i, lines[i], want)
				}
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := config.Load(path, nil, nil)
	if err == nil || !strings.Contains(err.Error(), path) || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("Load(missing) = %v, want a not-exist error naming %s", err, path)
	}
}

func TestLoadEnv(t *testing.T) {
	tests := []struct {
		name  string
		env   []string
		check func(c config.Config) bool
		want  []string // errors; nil = success
	}{
		{
			name: "every type",
			env: []string{
				"DOCSTATE_COUCHDB_URL=https://couch:6984",
				"DOCSTATE_ENGINE_WORKERS=3",
				"DOCSTATE_ENGINE_LEASE=5m",
				"DOCSTATE_ENGINE_FULL_RESYNC_ON_START=false",
			},
			check: func(c config.Config) bool {
				return c.CouchDB.URL == "https://couch:6984" && c.Engine.Workers == 3 &&
					c.Engine.Lease.String() == "5m0s" && !c.Engine.FullResyncOnStart
			},
		},
		{
			name:  "empty value sets empty",
			env:   []string{"DOCSTATE_HTTP_LISTEN="},
			check: func(c config.Config) bool { return c.HTTP.Listen == "" },
		},
		{
			name: "allowed and foreign variables are ignored",
			env: []string{
				"DOCSTATE_CONFIG=/etc/docstate/config.yaml",
				"DOCSTATE_TEST_COUCHDB=http://127.0.0.1:1",
				"PATH=/usr/bin",
				"docstate_engine_wrokers=1",
				"MALFORMED",
			},
			check: func(c config.Config) bool { return c == config.Default() },
		},
		{
			name: "unknown variable",
			env:  []string{"DOCSTATE_ENGINE_WROKERS=4"},
			want: []string{"unknown environment variable DOCSTATE_ENGINE_WROKERS (did you mean DOCSTATE_ENGINE_WORKERS?)"},
		},
		{
			name: "unknown variable does not echo its value",
			env:  []string{"DOCSTATE_COUCHDB_PASWORD=s3cret"},
			want: []string{"unknown environment variable DOCSTATE_COUCHDB_PASWORD (did you mean DOCSTATE_COUCHDB_PASSWORD?)"},
		},
		{
			name: "bad values name the variable",
			env: []string{
				"DOCSTATE_ENGINE_WORKERS=lots",
				"DOCSTATE_ENGINE_LEASE=30",
				"DOCSTATE_ENGINE_FULL_RESYNC_ON_START=maybe",
			},
			want: []string{
				`DOCSTATE_ENGINE_WORKERS: invalid integer "lots": invalid syntax`,
				`DOCSTATE_ENGINE_LEASE: invalid duration "30", want a number with a unit such as "30s", "2m" or "1h"`,
				`DOCSTATE_ENGINE_FULL_RESYNC_ON_START: invalid boolean "maybe", want true or false`,
			},
		},
		{
			name: "space is not trimmed",
			env:  []string{"DOCSTATE_ENGINE_WORKERS=4 "},
			want: []string{`DOCSTATE_ENGINE_WORKERS: invalid integer "4 ": invalid syntax`},
		},
		{
			name: "valid syntax, invalid value",
			env:  []string{"DOCSTATE_ENGINE_WORKERS=0"},
			want: []string{"engine.workers: must be between 1 and 1024, got 0"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := config.Load("", tt.env, nil)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Load() = %v", err)
				}
				if !tt.check(got) {
					t.Errorf("Load() = %+v", got)
				}
				return
			}
			if err == nil {
				t.Fatalf("Load() = nil error, want %q", tt.want)
			}
			if lines := errorLines(err); !slices.Equal(lines, tt.want) {
				t.Errorf("Load() errors =\n%q\nwant\n%q", lines, tt.want)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("Load() error shows a secret: %v", err)
			}
		})
	}
}

func TestLoadOverrides(t *testing.T) {
	tests := []struct {
		name      string
		overrides map[string]string
		want      []string
	}{
		{
			name:      "unknown key",
			overrides: map[string]string{"engine.wrokers": "4"},
			want:      []string{`override: unknown key "engine.wrokers" (did you mean "engine.workers"?)`},
		},
		{
			name:      "env name is not a key",
			overrides: map[string]string{"DOCSTATE_ENGINE_WORKERS": "4"},
			want:      []string{`override: unknown key "DOCSTATE_ENGINE_WORKERS"`},
		},
		{
			name:      "section is not a key",
			overrides: map[string]string{"engine": "4"},
			want:      []string{`override: unknown key "engine"`},
		},
		{
			name:      "bad values, in key order",
			overrides: map[string]string{"engine.workers": "lots", "engine.lease": "long"},
			want: []string{
				`override engine.lease: invalid duration "long", want a number with a unit such as "30s", "2m" or "1h"`,
				`override engine.workers: invalid integer "lots": invalid syntax`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Load("", nil, tt.overrides)
			if err == nil {
				t.Fatalf("Load() = nil error, want %q", tt.want)
			}
			if lines := errorLines(err); !slices.Equal(lines, tt.want) {
				t.Errorf("Load() errors =\n%q\nwant\n%q", lines, tt.want)
			}
		})
	}
}

// TestLoadReportsAllSources checks that problems in the file, the
// environment and the overrides come back together.
func TestLoadReportsAllSources(t *testing.T) {
	path := writeConfig(t, "engine:\n  workers: lots\n")
	_, err := config.Load(path, []string{"DOCSTATE_NOPE=1"}, map[string]string{"nope": "1"})
	lines := errorLines(err)
	if len(lines) != 3 ||
		!strings.HasSuffix(lines[0], `config.yaml:2: engine.workers: invalid integer "lots": invalid syntax`) ||
		lines[1] != "unknown environment variable DOCSTATE_NOPE" ||
		lines[2] != `override: unknown key "nope"` {
		t.Errorf("Load() errors = %q", lines)
	}
}

func TestLoadValidationErrorsJoined(t *testing.T) {
	path := writeConfig(t, "engine:\n  workers: 0\n  feed_batch: 600\nlog:\n  level: loud\n")
	_, err := config.Load(path, nil, map[string]string{"engine.max_pending": "500"})
	want := []string{
		"engine.workers: must be between 1 and 1024, got 0",
		"engine.max_pending: must be at least engine.feed_batch (600), got 500",
		`log.level: must be one of debug, info, warn, error, got "loud"`,
	}
	if lines := errorLines(err); !slices.Equal(lines, want) {
		t.Errorf("Load() errors =\n%q\nwant\n%q", lines, want)
	}
}

func TestLoadPasswordFile(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    string
	}{
		{"newline", "s3cret\n", "s3cret"},
		{"no newline", "s3cret", "s3cret"},
		{"CRLF", "s3cret\r\n", "s3cret"},
		{"several newlines", "s3cret\n\n", "s3cret"},
		{"spaces are kept", " s3 cret \n", " s3 cret "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pwFile := filepath.Join(t.TempDir(), "pw")
			if err := os.WriteFile(pwFile, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			path := writeConfig(t, "couchdb:\n  username: docstate\n  password_file: "+pwFile+"\n")
			got, err := config.Load(path, nil, nil)
			if err != nil {
				t.Fatalf("Load() = %v", err)
			}
			if got.CouchDB.Password != tt.want || got.CouchDB.PasswordFile != "" {
				t.Errorf("password, password_file = %q, %q; want %q, \"\"",
					got.CouchDB.Password, got.CouchDB.PasswordFile, tt.want)
			}
			// The resolved config is self-contained and still valid.
			if err := got.Validate(); err != nil {
				t.Errorf("Validate() after Load = %v", err)
			}
		})
	}
}

func TestLoadPasswordErrors(t *testing.T) {
	const secret = "s3cret-do-not-print"
	dir := t.TempDir()
	emptyFile := filepath.Join(dir, "empty")
	if err := os.WriteFile(emptyFile, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bigFile := filepath.Join(dir, "big")
	if err := os.WriteFile(bigFile, []byte(strings.Repeat(secret, 10000)), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")

	tests := []struct {
		name      string
		file      string
		env       []string
		overrides map[string]string
		want      []string // substrings, one per error
	}{
		{
			name: "password and password_file",
			file: "couchdb:\n  username: docstate\n  password: " + secret + "\n",
			env:  []string{"DOCSTATE_COUCHDB_PASSWORD_FILE=" + emptyFile},
			want: []string{"couchdb.password_file: cannot be combined with couchdb.password; set only one"},
		},
		{
			name:      "missing file",
			overrides: map[string]string{"couchdb.username": "docstate", "couchdb.password_file": missing},
			want:      []string{"couchdb.password_file: stat " + missing + ": no such file or directory"},
		},
		{
			name:      "empty file",
			overrides: map[string]string{"couchdb.username": "docstate", "couchdb.password_file": emptyFile},
			want:      []string{"couchdb.password_file: " + emptyFile + ": empty"},
		},
		{
			name:      "directory",
			overrides: map[string]string{"couchdb.username": "docstate", "couchdb.password_file": dir},
			want:      []string{"couchdb.password_file: " + dir + ": not a regular file"},
		},
		{
			name:      "too big",
			overrides: map[string]string{"couchdb.username": "docstate", "couchdb.password_file": bigFile},
			want:      []string{"couchdb.password_file: " + bigFile + ": larger than 65536 bytes, not a password file"},
		},
		{
			name:      "missing file reported with other problems",
			overrides: map[string]string{"couchdb.password_file": missing},
			want: []string{
				"couchdb.username: required when couchdb.password or couchdb.password_file is set",
				"couchdb.password_file: stat " + missing,
			},
		},
		{
			name: "credentials in URL",
			env:  []string{"DOCSTATE_COUCHDB_URL=http://admin:" + secret + "@couch:5984"},
			want: []string{"couchdb.url: must not contain credentials"},
		},
		{
			name: "password with other problems",
			env: []string{
				"DOCSTATE_COUCHDB_USERNAME=docstate",
				"DOCSTATE_COUCHDB_PASSWORD=" + secret,
				"DOCSTATE_ENGINE_WORKERS=0",
			},
			want: []string{"engine.workers: must be between 1 and 1024, got 0"},
		},
		{
			name: "password of the wrong shape",
			file: "couchdb:\n  password:\n    - " + secret + "\n",
			want: []string{"config.yaml:2: couchdb.password: must be a single value, got a list"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := ""
			if tt.file != "" {
				path = writeConfig(t, tt.file)
			}
			_, err := config.Load(path, tt.env, tt.overrides)
			if err == nil {
				t.Fatalf("Load() = nil error, want %q", tt.want)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("Load() error shows the password: %v", err)
			}
			lines := errorLines(err)
			if len(lines) != len(tt.want) {
				t.Fatalf("Load() errors = %q, want %d", lines, len(tt.want))
			}
			for i, want := range tt.want {
				if !strings.Contains(lines[i], want) {
					t.Errorf("error %d = %q, want it to contain %q", i, lines[i], want)
				}
			}
		})
	}
}

// unwrapAll returns the innermost error of a single-wrap chain.
func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		next := u.Unwrap()
		if next == nil {
			return err
		}
		err = next
	}
}
