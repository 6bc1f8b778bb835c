package config_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docstate/docstate/config"
)

// FuzzLoad feeds arbitrary bytes to Load as the config file. Load must
// never panic, must only return configs that validate, and must never put
// the password into an error or a redacted config.
func FuzzLoad(f *testing.F) {
	example, err := os.ReadFile("example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(""))
	f.Add([]byte("---\n"))
	f.Add([]byte("engine:\n  workers: 4\n  lease: 3m\nlog:\n  format: json\n"))
	f.Add([]byte("engine:\n  wrokers: lots\n  lease: 30\n"))
	f.Add([]byte("a: &a [*a]\nengine: &e {workers: *e}\n"))
	f.Add([]byte("base: &b {workers: 2}\nengine:\n  <<: *b\n"))
	f.Add([]byte("engine:\n  workers: 1\n---\nengine:\n  workers: 2\n"))
	f.Add([]byte("couchdb:\n  url: http://u:p@h:5984\n  password: x\n  password_file: /nonexistent\n"))
	f.Add([]byte("? [a, b]\n: c\n{x: 1}: 2\n"))
	f.Add([]byte("engine:\n\tworkers: 4\n"))

	// A marker that the generated file itself is unlikely to contain.
	const secret = "Zq9-fuzz-secret-Zq9"
	// One file per process, rewritten on each run: the fuzz function runs
	// sequentially within a worker, and a fresh TempDir per run costs
	// more than Load itself.
	path := filepath.Join(f.TempDir(), "config.yaml")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}

		c, err := config.Load(path, nil, nil)
		if err == nil {
			if verr := c.Validate(); verr != nil {
				t.Fatalf("Load succeeded with an invalid config: %v", verr)
			}
		}

		if bytes.Contains(data, []byte(secret)) {
			return
		}
		env := []string{"DOCSTATE_COUCHDB_USERNAME=u", "DOCSTATE_COUCHDB_PASSWORD=" + secret}
		c, err = config.Load(path, env, nil)
		if err != nil && strings.Contains(err.Error(), secret) {
			t.Fatalf("Load error shows the password: %v", err)
		}
		if s := fmt.Sprintf("%+v", c.Redacted()); strings.Contains(s, secret) {
			t.Fatalf("Redacted shows the password: %s", s)
		}
	})
}
