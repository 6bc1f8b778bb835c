package couch

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"

	kivik "github.com/go-kivik/kivik/v4"
)

// findPage is how many documents one _find request of FindEach asks for.
const findPage = 1000

// FindEach calls fn with every document matching the Mango selector (only
// fields, which must include "_id"; nil: whole documents), a page at a
// time in _id order, and returns how many it passed. Paging by _id rather
// than skip keeps each page's cost flat; Mango can sort by _id without an
// index, so nothing is created in the database. An error from fn stops the
// scan and is returned.
func FindEach(ctx context.Context, db *kivik.DB, selector map[string]any, fields []string, fn func(doc json.RawMessage) error) (int, error) {
	total, last := 0, ""
	for {
		sel := maps.Clone(selector)
		if sel == nil {
			sel = map[string]any{}
		}
		sel["_id"] = map[string]any{"$gt": last}
		query := map[string]any{
			"selector": sel,
			"sort":     []map[string]string{{"_id": "asc"}},
			"limit":    findPage,
		}
		if fields != nil {
			query["fields"] = fields
		}
		n, err := readPage(ctx, db, query, func(id string, doc rawDoc) error {
			last = id
			return fn(json.RawMessage(doc))
		})
		total += n
		if err != nil || n < findPage {
			return total, err
		}
	}
}

// readPage runs one _find query and calls fn with each row that has an
// _id, returning how many it passed; an error from fn stops it.
func readPage(ctx context.Context, db *kivik.DB, query map[string]any, fn func(id string, doc rawDoc) error) (int, error) {
	rows := db.Find(ctx, query)
	defer rows.Close()
	// Range over Iterator rather than calling rows.ScanDoc: ScanDoc reads
	// the iterator's state without its lock, which races with kivik
	// closing the iterator when ctx is cancelled. Iterator hands out a
	// copy of each row.
	n := 0
	for row, err := range rows.Iterator() {
		if err != nil {
			return n, err
		}
		var doc rawDoc
		var d struct {
			ID string `json:"_id"`
		}
		if row.ScanDoc(&doc) != nil || json.Unmarshal(doc, &d) != nil || d.ID == "" {
			continue
		}
		n++
		if err := fn(d.ID, doc); err != nil {
			return n, err
		}
	}
	return n, nil
}

// rawDoc keeps a document's bytes as they came.
type rawDoc []byte

func (d *rawDoc) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	*d = append((*d)[:0], b...)
	return nil
}

// HasDBUpdates reports whether the server offers a usable /_db_updates
// feed: it answers a normal request for it without an error. PouchDB
// Server answers 400, and CouchDB without _global_changes an error too.
// It asks once, without retrying a server that does not answer.
func HasDBUpdates(ctx context.Context, client *kivik.Client) bool {
	rows := client.DBUpdates(ctx, kivik.Params(map[string]any{"feed": "normal", "since": "now"}))
	defer rows.Close()
	for _, err := range rows.Iterator() {
		if err != nil {
			return false
		}
	}
	return true
}

// FindEachSorted calls fn with the _id of every document matching the
// Mango selector, a page at a time in the order of the string field, which
// the json index ddoc/name must cover and selector must bound with an
// operator map (e.g. {"$lte": x}). Each page starts at the highest value of
// the last (inclusive) and skips the documents already seen at that value,
// so a page costs the index's range, not the whole database. Documents
// whose field changes during the scan may be missed or passed twice: it
// suits scans that repeat (a due scan), not exact listings.
func FindEachSorted(ctx context.Context, db *kivik.DB, selector map[string]any, field, ddoc, name string, fn func(id string) error) (int, error) {
	bound, ok := selector[field].(map[string]any)
	if !ok {
		return 0, fmt.Errorf("find by %s: the selector must bound it with an operator map", field)
	}
	path := strings.Split(field, ".")
	total, from, skip := 0, "", 0
	for {
		cond := maps.Clone(bound)
		if from != "" {
			cond["$gte"] = from
		}
		sel := maps.Clone(selector)
		sel[field] = cond
		query := map[string]any{
			"selector":  sel,
			"sort":      []map[string]string{{field: "asc"}},
			"limit":     findPage,
			"skip":      skip,
			"fields":    []string{"_id", field},
			"use_index": []string{ddoc, name},
		}
		last, atLast := "", 0
		n, err := readPage(ctx, db, query, func(id string, doc rawDoc) error {
			var m map[string]any
			_ = json.Unmarshal(doc, &m)
			if v := stringAt(m, path); v == last && atLast > 0 {
				atLast++
			} else {
				last, atLast = v, 1
			}
			return fn(id)
		})
		total += n
		if err != nil || n < findPage {
			return total, err
		}
		if last == from {
			skip += n // the whole page at one value
		} else {
			from, skip = last, atLast
		}
	}
}

// stringAt returns the string at path in doc, or "".
func stringAt(doc map[string]any, path []string) string {
	var v any = doc
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = m[p]
	}
	s, _ := v.(string)
	return s
}
