package couch_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
)

// FindEachSorted passes every matching document once, also when more
// documents share one value than a page holds (claims written by one group
// commit share their expiry to the millisecond), and never one outside the
// bound.
func TestFindEachSortedPagesThroughTies(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	var docs []any
	want := map[string]bool{}
	add := func(id, due string, match bool) {
		docs = append(docs, map[string]any{"_id": id, "docstate": map[string]any{"due": due}})
		if match {
			want[id] = true
		}
	}
	for i := range 1500 { // more ties than a page, across its boundary
		add(fmt.Sprintf("tie-%04d", i), "2026-01-02T00:00:00.000Z", true)
	}
	for i := range 700 {
		add(fmt.Sprintf("early-%04d", i), fmt.Sprintf("2026-01-01T00:%02d:%02d.000Z", i/60, i%60), true)
	}
	for i := range 900 {
		add(fmt.Sprintf("late-%04d", i), fmt.Sprintf("2026-01-03T00:%02d:%02d.000Z", i/60, i%60), i < 450)
	}
	docs = append(docs, map[string]any{"_id": "no-due", "docstate": map[string]any{}})
	for start := 0; start < len(docs); start += 500 {
		if _, err := db.BulkDocs(ctx, docs[start:min(start+500, len(docs))]); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.CreateIndex(ctx, "docstate-due", "due", map[string]any{"fields": []string{"docstate.due"}}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	n, err := couch.FindEachSorted(ctx, db, map[string]any{"docstate.due": map[string]any{"$lt": "2026-01-03T00:07:30.000Z"}},
		"docstate.due", "docstate-due", "due", func(id string) error {
			seen[id]++
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	if n != len(want) {
		t.Errorf("passed %d documents, want %d", n, len(want))
	}
	for id := range want {
		if seen[id] != 1 {
			t.Errorf("%s passed %d times, want once", id, seen[id])
		}
	}
	for id := range seen {
		if !want[id] {
			t.Errorf("%s passed, outside the bound", id)
		}
	}
	if _, err := couch.FindEachSorted(ctx, db, map[string]any{"docstate.due": "x"}, "docstate.due", "docstate-due", "due",
		func(string) error { return nil }); err == nil {
		t.Error("a selector without an operator map on the field was taken")
	}
}

func TestMain(m *testing.M) { couchtest.Main(m) }
