package devices

import (
	"context"
	_ "embed" // the validate_doc_update source
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// DesignDocID is where the validation function lives.
const DesignDocID = "_design/docstate-devices"

//go:embed validate_doc_update.js
var validateSource string

// UserDBDesignID is where a per-owner control database's validation
// function lives (see validate_userdb.js).
const UserDBDesignID = "_design/docstate-userdb"

//go:embed validate_userdb.js
var userDBValidateSource string

// writerRolePlaceholder is replaced in validateSource by the writer role,
// as a JavaScript string literal, or left as null.
const writerRolePlaceholder = "null /* docstate:writer-role */"

// ValidateDocUpdate returns the validate_doc_update function InstallValidation
// installs for writerRole ("" = only admins may write docstate's fields).
//
// The rules, in the order the function applies them:
//
//  1. A server admin (role _admin), a user with writerRole, and a database
//     admin (a name or role in the _security object's admins) may write
//     anything. Database admins can replace the design document anyway, and
//     a daemon that runs as a database admin must pass its own function.
//  2. Everyone else may not write design documents (CouchDB and PouchDB
//     Server already refuse those to non-admins before the function runs).
//  3. nor delete any document (_deleted: true),
//  4. nor write a document whose _id starts with "device-address:" (the
//     per-address rate limits) or whose type is not "device" (a missing type
//     included), in the new or in the stored revision,
//  5. and may create a device document (no stored revision, or a deleted
//     one) only in state "new" and with no fields but _id, _rev,
//     _revisions, type, state, owner, device_name and credentials: none of
//     the fields docstate writes, nor the engine's "docstate" field, nor
//     _attachments.
//  6. An update by a device may add, change or remove only confirm_attempt
//     and resend_requested, and only while the stored state is
//     "confirming", and revoke_requested, only while it is "active". Every
//     other field (type, state, owner, credentials, every field docstate
//     writes, the engine's "docstate") must be deep-equal (JSON values, any
//     key order) between the stored and the new revision, present in both
//     or absent in both. _id, _rev and _revisions are not compared.
//
// A refusal throws {forbidden: "docstate: <reason naming the field>"}: HTTP
// 403 with {"error":"forbidden","reason":"docstate: ..."} on CouchDB 3 and
// on PouchDB Server; in a _bulk_docs answer the document's entry is
// {"id":…,"error":"forbidden","reason":…} (kivik reports that as status 500).
// The function checks no sizes or value types: the handlers validate what
// devices write.
//
// Server differences. CouchDB 3 checks _rev before the function and
// passes the revision the write is based on as oldDoc, so a stale write is
// a 409. PouchDB Server (pouchdb-validation 4.2.0) runs the function first,
// against the current revision: a stale device write that the daemon's
// changes make differ is a 403, and devices must re-read after a 403 and
// retry when _rev moved. pouchdb-validation also replaces a replicated
// revision's _revisions (new_edits=false) with the stored document's, so
// replicated updates of existing documents are dropped (201 []) whenever
// any validation function is installed; CouchDB stores them.
func ValidateDocUpdate(writerRole string) string {
	role := "null"
	if writerRole != "" {
		b, _ := json.Marshal(writerRole) // a string always marshals
		role = string(b)
	}
	return strings.Replace(validateSource, writerRolePlaceholder, role, 1)
}

// designDoc is the design document InstallValidation writes.
type designDoc struct {
	ID                string `json:"_id"`
	Rev               string `json:"_rev,omitempty"`
	Language          string `json:"language"`
	ValidateDocUpdate string `json:"validate_doc_update"`
}

// installTries bounds the read-compare-write rounds of InstallValidation
// when other writers keep changing the design document.
const installTries = 10

// InstallValidation writes (or updates, when its content changed) the design
// doc with the validate_doc_update function into db (see ValidateDocUpdate
// for the rules). Idempotent: an unchanged design document is not written
// again. Safe when several daemons race: a 409 re-reads, compares and
// retries. writerRole: the role (besides _admin) allowed to write daemon
// fields, e.g. "docstate"; "" = only _admin (and database admins).
//
// The client of db must be a server or database admin: only admins write
// design documents.
func InstallValidation(ctx context.Context, db *kivik.DB, writerRole string) error {
	_, err := EnsureValidation(ctx, db, writerRole)
	return err
}

// EnsureValidation is InstallValidation that reports whether it wrote the
// design document: it was missing or held another function. A daemon calls
// it periodically to put back a validation function deleted or edited by
// hand, or lost with a re-created database.
func EnsureValidation(ctx context.Context, db *kivik.DB, writerRole string) (written bool, err error) {
	if !strings.HasPrefix(validateSource, "function") || !strings.Contains(validateSource, writerRolePlaceholder) {
		// Guards the embedded file: PouchDB Server compiles "return " + source.
		return false, errors.New("devices: validate_doc_update.js must start with \"function\" and hold the writer role placeholder")
	}
	return installDesign(ctx, db, DesignDocID, ValidateDocUpdate(writerRole))
}

// installDesign writes the design document id with source as its
// validate_doc_update unless it is there unchanged, and reports whether it
// wrote. A 409 (another daemon, an operator) re-reads and compares again.
func installDesign(ctx context.Context, db *kivik.DB, id, source string) (bool, error) {
	want := designDoc{ID: id, Language: "javascript", ValidateDocUpdate: source}
	for range installTries {
		var cur map[string]json.RawMessage
		err := db.Get(ctx, id).ScanDoc(&cur)
		switch {
		case couch.IsNotFound(err):
			want.Rev = ""
		case err != nil:
			return false, fmt.Errorf("devices: read %s: %w", id, err)
		default:
			if sameDesign(cur, want) {
				return false, nil
			}
			if err := json.Unmarshal(cur["_rev"], &want.Rev); err != nil {
				return false, fmt.Errorf("devices: read %s: bad _rev: %w", id, err)
			}
		}
		_, err = db.Put(ctx, id, want)
		if couch.IsConflict(err) {
			continue // another daemon (or an operator) wrote it meanwhile
		}
		if err != nil {
			return false, fmt.Errorf("devices: write %s: %w", id, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("devices: write %s: kept conflicting with other writers", id)
}

// sameDesign reports whether the stored design document holds exactly the
// fields of want (besides _id, _rev and anything starting with "_" the
// server adds), with the same values.
func sameDesign(cur map[string]json.RawMessage, want designDoc) bool {
	fields := map[string]string{"language": want.Language, "validate_doc_update": want.ValidateDocUpdate}
	n := 0
	for k, raw := range cur {
		if strings.HasPrefix(k, "_") {
			continue
		}
		w, ok := fields[k]
		if !ok {
			return false
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil || s != w {
			return false
		}
		n++
	}
	return n == len(fields)
}
