package devices

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

const (
	usersDB       = "_users"
	userIDPrefix  = "org.couchdb.user:"
	userMarkField = "docstate_device" // the device doc id a _users entry belongs to
	maxWriteTries = 8
)

// provision creates or updates the device's _users entry with the
// device's own PBKDF2 hash and the owner's role only. It is idempotent, so
// a takeover after a crash simply writes it again. An entry of the same
// name that another device document owns is never touched.
func (d *Devices) provision(ctx context.Context, docID, name, role string, c Credentials) error {
	db := d.opts.Client.DB(usersDB)
	id := userIDPrefix + name
	for range maxWriteTries {
		body := map[string]any{
			"_id":             id,
			"name":            name,
			"type":            "user",
			"roles":           []string{role},
			"password_scheme": c.PasswordScheme,
			"derived_key":     c.DerivedKey,
			"salt":            c.Salt,
			"iterations":      c.Iterations,
			userMarkField:     docID,
		}
		var cur map[string]json.RawMessage
		err := db.Get(ctx, id).ScanDoc(&cur)
		switch {
		case couch.IsNotFound(err):
		case err != nil:
			return fmt.Errorf("read %s: %w", id, err)
		default:
			var owner string
			_ = json.Unmarshal(cur[userMarkField], &owner)
			if owner != docID {
				return workflow.Terminal(fmt.Errorf("CouchDB user %q exists and does not belong to this device", name))
			}
			var rev string
			_ = json.Unmarshal(cur["_rev"], &rev)
			body["_rev"] = rev
		}
		_, err = db.Put(ctx, id, body)
		if couch.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", id, err)
		}
		return nil
	}
	return fmt.Errorf("write %s: kept conflicting", id)
}

// deprovision deletes the device's _users entry. Deleting (rather than
// emptying roles and scrambling the password) also ends cookie sessions,
// which CouchDB checks against the user document, and leaves nothing to
// reactivate by mistake. Gone already is fine.
func (d *Devices) deprovision(ctx context.Context, docID, name string) error {
	db := d.opts.Client.DB(usersDB)
	id := userIDPrefix + name
	for range maxWriteTries {
		var cur struct {
			Rev  string `json:"_rev"`
			Mark string `json:"docstate_device"`
		}
		err := db.Get(ctx, id).ScanDoc(&cur)
		if couch.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", id, err)
		}
		if cur.Mark != docID {
			return workflow.Terminal(fmt.Errorf("CouchDB user %q does not belong to this device", name))
		}
		_, err = db.Delete(ctx, id, cur.Rev)
		if couch.IsConflict(err) {
			continue
		}
		if err != nil && !couch.IsNotFound(err) {
			return fmt.Errorf("delete %s: %w", id, err)
		}
		return nil
	}
	return fmt.Errorf("delete %s: kept conflicting", id)
}
