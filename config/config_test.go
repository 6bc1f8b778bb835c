package config_test

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/docstate/docstate/config"
)

func TestDefaultIsValid(t *testing.T) {
	if err := config.Default().Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v, want nil", err)
	}
}

func TestValidateRules(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(c *config.Config)
		want   string // full error message; "" = valid
	}{
		// couchdb.url
		{"url https with path", func(c *config.Config) { c.CouchDB.URL = "https://couch.example.com:6984/prefix" }, ""},
		{"url empty", func(c *config.Config) { c.CouchDB.URL = "" }, "couchdb.url: required"},
		{"url without scheme", func(c *config.Config) { c.CouchDB.URL = "127.0.0.1:5984" },
			`couchdb.url: must start with http:// or https://, got "127.0.0.1:5984"`},
		{"url ftp", func(c *config.Config) { c.CouchDB.URL = "ftp://couch:21" },
			`couchdb.url: scheme must be http or https, got "ftp"`},
		{"url without host", func(c *config.Config) { c.CouchDB.URL = "http://:5984" },
			`couchdb.url: must include a host, got "http://:5984"`},
		{"url with query", func(c *config.Config) { c.CouchDB.URL = "http://couch:5984/?x=1" },
			`couchdb.url: must not have a query or fragment, got "http://couch:5984/?x=1"`},
		{"url with credentials", func(c *config.Config) { c.CouchDB.URL = "http://admin:s3cret@couch:5984" },
			"couchdb.url: must not contain credentials; set couchdb.username and couchdb.password_file (or couchdb.password) instead"},
		{"url with user only", func(c *config.Config) { c.CouchDB.URL = "http://admin@couch:5984" },
			"couchdb.url: must not contain credentials; set couchdb.username and couchdb.password_file (or couchdb.password) instead"},
		{"url unparsable with credentials", func(c *config.Config) { c.CouchDB.URL = "http://admin:s3%zz@couch" },
			"couchdb.url: not a valid URL (value not shown: it may contain credentials)"},

		// couchdb.username, password, password_file
		{"username and password", func(c *config.Config) {
			c.CouchDB.Username = "docstate"
			c.CouchDB.Password = "s3cret"
		}, ""},
		{"password without username", func(c *config.Config) { c.CouchDB.Password = "s3cret" },
			"couchdb.username: required when couchdb.password or couchdb.password_file is set"},
		{"password_file without username", func(c *config.Config) { c.CouchDB.PasswordFile = "/run/pw" },
			"couchdb.username: required when couchdb.password or couchdb.password_file is set"},
		{"username with colon", func(c *config.Config) { c.CouchDB.Username = "a:b" },
			"couchdb.username: must not contain ':', which HTTP basic auth cannot carry"},
		{"password and password_file", func(c *config.Config) {
			c.CouchDB.Username = "docstate"
			c.CouchDB.Password = "s3cret"
			c.CouchDB.PasswordFile = "/run/pw"
		}, "couchdb.password_file: cannot be combined with couchdb.password; set only one"},
		{"max_connections 0", func(c *config.Config) { c.CouchDB.MaxConnections = 0 },
			"couchdb.max_connections: must be at least 1, got 0"},

		// database
		{"database all allowed characters", func(c *config.Config) { c.Database = "a0_$()+-/z" }, ""},
		{"database 238 characters", func(c *config.Config) { c.Database = strings.Repeat("d", 238) }, ""},
		{"database empty", func(c *config.Config) { c.Database = "" }, "database: required"},
		{"database 239 characters", func(c *config.Config) { c.Database = strings.Repeat("d", 239) },
			"database: must be at most 238 characters, got 239"},
		{"database upper case", func(c *config.Config) { c.Database = "Docs" },
			`database: must match ^[a-z][a-z0-9_$()+/-]*$, got "Docs"`},
		{"database system name", func(c *config.Config) { c.Database = "_users" },
			`database: must match ^[a-z][a-z0-9_$()+/-]*$, got "_users"`},
		{"database leading digit", func(c *config.Config) { c.Database = "1docs" },
			`database: must match ^[a-z][a-z0-9_$()+/-]*$, got "1docs"`},
		{"database space", func(c *config.Config) { c.Database = "my docs" },
			`database: must match ^[a-z][a-z0-9_$()+/-]*$, got "my docs"`},

		// engine
		{"workers 1", func(c *config.Config) { c.Engine.Workers = 1 }, ""},
		{"workers 1024", func(c *config.Config) { c.Engine.Workers = 1024 }, ""},
		{"workers 0", func(c *config.Config) { c.Engine.Workers = 0 },
			"engine.workers: must be between 1 and 1024, got 0"},
		{"workers 1025", func(c *config.Config) { c.Engine.Workers = 1025 },
			"engine.workers: must be between 1 and 1024, got 1025"},
		{"lease 1s", func(c *config.Config) {
			c.Engine.Lease = time.Second
			c.Engine.HandlerTimeout = 500 * time.Millisecond
		}, ""},
		{"lease below 1s", func(c *config.Config) {
			c.Engine.Lease = 999 * time.Millisecond
			c.Engine.HandlerTimeout = 500 * time.Millisecond
		}, "engine.lease: must be at least 1s, got 999ms"},
		{"handler_timeout 0", func(c *config.Config) { c.Engine.HandlerTimeout = 0 },
			"engine.handler_timeout: must be greater than 0, got 0s"},
		{"handler_timeout equal to lease", func(c *config.Config) { c.Engine.HandlerTimeout = 2 * time.Minute },
			"engine.handler_timeout: must be less than engine.lease (2m), got 2m"},
		{"max_attempts 0", func(c *config.Config) { c.Engine.MaxAttempts = 0 },
			"engine.max_attempts: must be between 1 and 1000, got 0"},
		{"max_attempts 1001", func(c *config.Config) { c.Engine.MaxAttempts = 1001 },
			"engine.max_attempts: must be between 1 and 1000, got 1001"},
		{"retry_base equal to retry_max", func(c *config.Config) { c.Engine.RetryBase = time.Hour }, ""},
		{"retry_base 0", func(c *config.Config) { c.Engine.RetryBase = 0 },
			"engine.retry_base: must be greater than 0, got 0s"},
		{"retry_base above retry_max", func(c *config.Config) { c.Engine.RetryBase = 90 * time.Minute },
			"engine.retry_base: must be at most engine.retry_max (1h), got 1h30m"},
		{"retry_max negative", func(c *config.Config) {
			c.Engine.RetryBase = time.Second
			c.Engine.RetryMax = -time.Second
		}, "engine.retry_base: must be at most engine.retry_max (-1s), got 1s\nengine.retry_max: must be greater than 0, got -1s"},
		{"resync_interval below 1s", func(c *config.Config) { c.Engine.ResyncInterval = 500 * time.Millisecond },
			"engine.resync_interval: must be at least 1s, got 500ms"},
		{"checkpoint_interval 100ms", func(c *config.Config) { c.Engine.CheckpointInterval = 100 * time.Millisecond }, ""},
		{"checkpoint_interval below 100ms", func(c *config.Config) { c.Engine.CheckpointInterval = 99 * time.Millisecond },
			"engine.checkpoint_interval: must be at least 100ms, got 99ms"},
		{"feed_timeout 10m", func(c *config.Config) { c.Engine.FeedTimeout = 10 * time.Minute }, ""},
		{"feed_timeout below 1s", func(c *config.Config) { c.Engine.FeedTimeout = 999 * time.Millisecond },
			"engine.feed_timeout: must be between 1s and 10m, got 999ms"},
		{"feed_timeout above 10m", func(c *config.Config) { c.Engine.FeedTimeout = 10*time.Minute + time.Second },
			"engine.feed_timeout: must be between 1s and 10m, got 10m1s"},
		{"feed_batch 0", func(c *config.Config) { c.Engine.FeedBatch = 0 },
			"engine.feed_batch: must be between 1 and 10000, got 0"},
		{"feed_batch 10001", func(c *config.Config) {
			c.Engine.FeedBatch = 10001
			c.Engine.MaxPending = 20000
		}, "engine.feed_batch: must be between 1 and 10000, got 10001"},
		{"max_pending equal to feed_batch", func(c *config.Config) { c.Engine.MaxPending = 500 }, ""},
		{"max_pending below feed_batch", func(c *config.Config) { c.Engine.MaxPending = 499 },
			"engine.max_pending: must be at least engine.feed_batch (500), got 499"},
		{"drain_timeout 0", func(c *config.Config) { c.Engine.DrainTimeout = 0 }, ""},
		{"drain_timeout negative", func(c *config.Config) { c.Engine.DrainTimeout = -time.Second },
			"engine.drain_timeout: must be at least 0s, got -1s"},

		// log, http
		{"log level debug", func(c *config.Config) { c.Log.Level = "debug" }, ""},
		{"log level unknown", func(c *config.Config) { c.Log.Level = "verbose" },
			`log.level: must be one of debug, info, warn, error, got "verbose"`},
		{"log level upper case", func(c *config.Config) { c.Log.Level = "INFO" },
			`log.level: must be one of debug, info, warn, error, got "INFO"`},
		{"log format json", func(c *config.Config) { c.Log.Format = "json" }, ""},
		{"log format unknown", func(c *config.Config) { c.Log.Format = "xml" },
			`log.format: must be one of text, json, got "xml"`},
		{"listen off", func(c *config.Config) { c.HTTP.Listen = "" }, ""},
		{"listen all interfaces", func(c *config.Config) { c.HTTP.Listen = ":9090" }, ""},
		{"listen IPv6", func(c *config.Config) { c.HTTP.Listen = "[::1]:9090" }, ""},
		{"listen any port", func(c *config.Config) { c.HTTP.Listen = "127.0.0.1:0" }, ""},
		{"listen without port", func(c *config.Config) { c.HTTP.Listen = "9090" },
			`http.listen: must be host:port such as "127.0.0.1:9090" or ":9090", got "9090"`},
		{"listen port too large", func(c *config.Config) { c.HTTP.Listen = "localhost:65536" },
			`http.listen: port must be a number between 0 and 65535, got "65536"`},
		{"listen named port", func(c *config.Config) { c.HTTP.Listen = "localhost:http" },
			`http.listen: port must be a number between 0 and 65535, got "http"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := config.Default()
			tt.mutate(&c)
			err := c.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %q", tt.want)
			}
			if got := err.Error(); got != tt.want {
				t.Fatalf("Validate() =\n%s\nwant\n%s", got, tt.want)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("Validate() error contains the password: %v", err)
			}
		})
	}
}

func TestValidateReportsAllProblems(t *testing.T) {
	c := config.Default()
	c.Database = ""
	c.Engine.Workers = 0
	c.Engine.MaxAttempts = 0
	c.Log.Format = "xml"

	err := c.Validate()
	if err == nil {
		t.Fatal("Validate() = nil, want errors")
	}
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("Validate() error %T is not an errors.Join", err)
	}
	var got []string
	for _, e := range joined.Unwrap() {
		got = append(got, e.Error())
	}
	want := []string{
		"database: required",
		"engine.workers: must be between 1 and 1024, got 0",
		"engine.max_attempts: must be between 1 and 1000, got 0",
		`log.format: must be one of text, json, got "xml"`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Validate() errors =\n%q\nwant\n%q", got, want)
	}
}

func TestRedacted(t *testing.T) {
	const secret = "hunter2-secret"
	tests := []struct {
		name         string
		password     string
		url          string
		wantPassword string
		wantURL      string
	}{
		{"password", secret, "http://127.0.0.1:5984", "[redacted]", "http://127.0.0.1:5984"},
		{"no password", "", "http://127.0.0.1:5984", "", "http://127.0.0.1:5984"},
		{"password in URL", "", "http://admin:" + secret + "@couch:5984/", "", "http://admin:xxxxx@couch:5984/"},
		{"unparsable URL with credentials", "", "http://admin:" + secret + "%zz@couch/", "", "[redacted]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := config.Default()
			c.CouchDB.Username = "admin"
			c.CouchDB.Password = tt.password
			c.CouchDB.URL = tt.url

			r := c.Redacted()
			if r.CouchDB.Password != tt.wantPassword || r.CouchDB.URL != tt.wantURL {
				t.Errorf("Redacted() password, url = %q, %q; want %q, %q",
					r.CouchDB.Password, r.CouchDB.URL, tt.wantPassword, tt.wantURL)
			}
			out, err := yaml.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			if s := string(out) + fmt.Sprintf("%+v", r); strings.Contains(s, secret) {
				t.Errorf("Redacted() still shows the secret:\n%s", s)
			}
			if c.CouchDB.Password != tt.password || c.CouchDB.URL != tt.url {
				t.Error("Redacted() modified the receiver")
			}
		})
	}
}

func TestKeys(t *testing.T) {
	keys := config.Keys()
	seenKey := make(map[string]bool)
	seenEnv := make(map[string]bool)
	overrides := make(map[string]string)
	for _, k := range keys {
		if seenKey[k.Key] || seenEnv[k.Env] {
			t.Errorf("duplicate key %q or env %q", k.Key, k.Env)
		}
		seenKey[k.Key], seenEnv[k.Env] = true, true
		if want := "DOCSTATE_" + strings.ToUpper(strings.ReplaceAll(k.Key, ".", "_")); k.Env != want {
			t.Errorf("%s: Env = %q, want %q", k.Key, k.Env, want)
		}
		if k.Help == "" || strings.Contains(k.Help, "\n") {
			t.Errorf("%s: Help = %q, want one non-empty line", k.Key, k.Help)
		}
		if !slices.Contains([]string{"string", "int", "bool", "duration"}, k.Type) {
			t.Errorf("%s: Type = %q", k.Key, k.Type)
		}
		overrides[k.Key] = k.Default
	}
	if !seenKey["couchdb.password"] || !slices.ContainsFunc(keys, func(k config.KeyInfo) bool {
		return k.Key == "couchdb.password" && k.Secret
	}) {
		t.Error("couchdb.password missing or not marked secret")
	}

	// Every default, written back through the overrides, gives Default():
	// the documented defaults are in a syntax the sources accept.
	got, err := config.Load("", nil, overrides)
	if err != nil {
		t.Fatalf("Load(defaults from Keys) = %v", err)
	}
	if got != config.Default() {
		t.Errorf("Load(defaults from Keys) = %+v, want %+v", got, config.Default())
	}
	for _, k := range keys {
		if strings.HasSuffix(k.Default, "m0s") || strings.HasSuffix(k.Default, "h0m") {
			t.Errorf("%s: Default = %q, want the short form (e.g. 2m, not 2m0s)", k.Key, k.Default)
		}
	}

	// The struct's yaml tags and the key table describe the same keys, so
	// yaml.Marshal of a Config is a file Load accepts.
	out, err := yaml.Marshal(config.Default())
	if err != nil {
		t.Fatal(err)
	}
	if got := yamlKeys(t, out); !slices.Equal(got, slices.Sorted(maps.Keys(seenKey))) {
		t.Errorf("yaml tags = %v\nwant Keys() = %v", got, slices.Sorted(maps.Keys(seenKey)))
	}
	path := writeConfig(t, string(out))
	got, err = config.Load(path, nil, nil)
	if err != nil || got != config.Default() {
		t.Errorf("Load(yaml.Marshal(Default())) = %+v, %v; want Default()", got, err)
	}
}

// TestExampleFile keeps example.yaml in step with the code: it loads and
// validates, it documents every key with a comment, and its values are the
// defaults except the credential placeholders.
func TestExampleFile(t *testing.T) {
	data, err := os.ReadFile("example.yaml")
	if err != nil {
		t.Fatal(err)
	}

	// The placeholder password file does not exist here; point it at one
	// that does so that Load succeeds.
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte("pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := config.Load("example.yaml", nil, map[string]string{"couchdb.password_file": pwFile})
	if err != nil {
		t.Fatalf("Load(example.yaml) = %v", err)
	}
	if err := got.Validate(); err != nil {
		t.Fatalf("Load(example.yaml).Validate() = %v", err)
	}
	want := config.Default()
	want.CouchDB.Username = "docstate"
	want.CouchDB.Password = "pw"
	if got != want {
		t.Errorf("example.yaml values =\n%+v\nwant defaults\n%+v", got, want)
	}

	var keys []string
	for _, k := range config.Keys() {
		keys = append(keys, k.Key)
	}
	slices.Sort(keys)
	if got := yamlKeys(t, data); !slices.Equal(got, keys) {
		t.Errorf("example.yaml keys = %v\nwant Keys() = %v", got, keys)
	}

	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	walkLeaves(doc.Content[0], "", func(key string, k, v *yaml.Node) {
		if k.HeadComment == "" && k.LineComment == "" && v.LineComment == "" {
			t.Errorf("example.yaml:%d: %s has no comment", k.Line, key)
		}
	})
}

// yamlKeys returns the sorted dotted leaf keys of a YAML mapping.
func yamlKeys(t *testing.T, data []byte) []string {
	t.Helper()
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	var keys []string
	walkLeaves(doc.Content[0], "", func(key string, _, _ *yaml.Node) { keys = append(keys, key) })
	slices.Sort(keys)
	return keys
}

func walkLeaves(n *yaml.Node, prefix string, fn func(key string, k, v *yaml.Node)) {
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := k.Value
		if prefix != "" {
			key = prefix + "." + key
		}
		if v.Kind == yaml.MappingNode {
			walkLeaves(v, key, fn)
			continue
		}
		fn(key, k, v)
	}
}

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// errorLines returns the messages of an errors.Join, which Load and
// Validate return flat: one error per problem.
func errorLines(err error) []string {
	if err == nil {
		return nil
	}
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []string{err.Error()}
	}
	var lines []string
	for _, e := range joined.Unwrap() {
		lines = append(lines, e.Error())
	}
	return lines
}

// A malformed channels.templates list is refused with the pair named.
func TestTemplatesListIsCheckedPairByPair(t *testing.T) {
	got, err := config.Channels{Templates: " starter = tmpl-starter , notes=tmpl-notes "}.TemplateMap()
	if err != nil || len(got) != 2 || got["starter"] != "tmpl-starter" || got["notes"] != "tmpl-notes" {
		t.Fatalf("%v %v", got, err)
	}
	for list, want := range map[string]string{
		"starter":        `"starter" must be name=database`,
		"Starter=tmpl":   `"Starter=tmpl": template name`,
		"s=userctl-0123": "is a control database",
		"s=_users":       "must start with a-z",
		"s=tmpl,s=other": `template "s" is listed twice`,
	} {
		if _, err := (config.Channels{Templates: list}).TemplateMap(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", list, err, want)
		}
	}
}
