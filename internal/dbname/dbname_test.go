package dbname_test

import (
	"strings"
	"testing"

	"github.com/docstate/docstate/internal/dbname"
)

func TestSlugsAndTemplateDatabases(t *testing.T) {
	for _, ok := range []string{"a", "photos", "c0", "a_b-c", strings.Repeat("x", 64)} {
		if err := dbname.CheckSlug(ok); err != nil {
			t.Errorf("slug %q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "_a", "-a", "A", "a/b", "../x", strings.Repeat("x", 65)} {
		if dbname.CheckSlug(bad) == nil {
			t.Errorf("slug %q accepted", bad)
		}
	}
	if err := dbname.CheckTemplateDB("tmpl-starter"); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{"", "Tmpl", "_users", "userctl-0123", "a b", strings.Repeat("a", 239)} {
		if dbname.CheckTemplateDB(bad) == nil {
			t.Errorf("template database %q accepted", bad)
		}
	}
}
