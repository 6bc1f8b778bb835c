package devices

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte(strings.Repeat("k", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadSecretFile(good); err != nil || len(b) != 32 {
		t.Fatalf("good secret: %v", err)
	}
	short := filepath.Join(dir, "short")
	_ = os.WriteFile(short, []byte("short-secret-value"), 0o600)
	open := filepath.Join(dir, "open")
	_ = os.WriteFile(open, []byte(strings.Repeat("k", 32)), 0o644)
	for _, p := range []string{short, open, dir, filepath.Join(dir, "missing")} {
		_, err := ReadSecretFile(p)
		if err == nil || strings.Contains(err.Error(), "short-secret-value") {
			t.Errorf("%s: %v", p, err)
		}
	}
}

func TestTemplatesOverrideAndCheck(t *testing.T) {
	dir := t.TempDir()
	_ = os.WriteFile(filepath.Join(dir, SubjectFile), []byte("Code for {{.DeviceName}}"), 0o600)
	tm, err := LoadTemplates(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := tm.render(TemplateData{DeviceName: "<b>x</b>", Code: "12345678", Owner: "a@b.c"})
	if err != nil || r.subject != "Code for <b>x</b>" || !strings.Contains(r.html, "&lt;b&gt;x&lt;/b&gt;") || !strings.Contains(r.text, "12345678") {
		t.Fatalf("render: %+v %v", r, err)
	}
	_ = os.WriteFile(filepath.Join(dir, TextFile), []byte("{{.Nope}}"), 0o600)
	if _, err := LoadTemplates(dir); err == nil {
		t.Fatal("a template naming an unknown field was accepted")
	}
}

func TestCheckEmail(t *testing.T) {
	for _, ok := range []string{"a@example.com", "a.b+c@sub.example.org"} {
		if err := CheckEmail(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a", "a@", "@b", "a b@c", "a@b\r\nBcc: x@y", "A <a@b>", "ä@b.c", "a@b@c", strings.Repeat("x", 65) + "@b.c"} {
		if err := CheckEmail(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
