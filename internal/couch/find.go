package couch

import (
	"context"
	"encoding/json"

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
		sel := make(map[string]any, len(selector)+1)
		for k, v := range selector {
			sel[k] = v
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
		rows := db.Find(ctx, query)
		// Range over Iterator rather than calling rows.ScanDoc: ScanDoc
		// reads the iterator's state without its lock, which races with
		// kivik closing the iterator when ctx is cancelled. Iterator hands
		// out a copy of each row.
		n := 0
		var err error
		for row, rowErr := range rows.Iterator() {
			if rowErr != nil {
				err = rowErr
				break
			}
			var doc rawDoc
			var d struct {
				ID string `json:"_id"`
			}
			if row.ScanDoc(&doc) != nil || json.Unmarshal(doc, &d) != nil || d.ID == "" {
				continue
			}
			last = d.ID
			n++
			if err = fn(json.RawMessage(doc)); err != nil {
				break
			}
		}
		_ = rows.Close()
		total += n
		if err != nil {
			return total, err
		}
		if n < findPage {
			return total, nil
		}
	}
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
