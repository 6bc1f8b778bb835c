package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docstate/docstate/cmd/cli"
)

type versionJSON struct {
	Version   string `json:"version"`
	GoVersion string `json:"go_version"`
	Revision  string `json:"revision"`
	Modified  bool   `json:"modified"`
}

// TestVersionRevisionFromLinkerFlags: where Go stamps no VCS information
// (GOFLAGS=-buildvcs=false), a binary built by scripts/build still names
// its commit, in text and in -o json.
func TestVersionRevisionFromLinkerFlags(t *testing.T) {
	t.Parallel()
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse HEAD: %v", err)
	}
	want := strings.TrimSpace(string(head))
	bin := filepath.Join(t.TempDir(), "docstate")
	build := exec.Command("../../scripts/build", "-o", bin, "./cmd/docstate")
	build.Env = append(os.Environ(), "GOFLAGS=-buildvcs=false")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("scripts/build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version", "-o", "json").Output()
	var v versionJSON
	if err != nil || json.Unmarshal(out, &v) != nil || v.Revision != want || !strings.HasPrefix(v.GoVersion, "go") {
		t.Fatalf("version -o json of a -buildvcs=false build: %v %+v, want revision %s\n%s", err, v, want, out)
	}
	text, err := exec.Command(bin, "version").Output()
	if err != nil || !strings.Contains(string(text), "vcs.revision "+want) {
		t.Fatalf("version: %v\n%s", err, text)
	}
}

func TestVersionJSONKeys(t *testing.T) {
	var out bytes.Buffer
	root := cli.NewRoot(cli.Options{Stdout: &out, Stderr: &out, Environ: []string{}, Revision: "abc123", Modified: "true"})
	root.SetArgs([]string{"version", "-o", "json"})
	if err := root.ExecuteContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	var keys map[string]any
	if err := json.Unmarshal(out.Bytes(), &keys); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, k := range []string{"version", "go_version", "revision", "modified"} {
		if _, ok := keys[k]; !ok {
			t.Errorf("version -o json lacks %q:\n%s", k, out.String())
		}
	}
	if keys["revision"] != "abc123" || keys["modified"] != true {
		t.Fatalf("revision from Options not shown:\n%s", out.String())
	}
}
