package devices

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// vduUser creates a _users entry (as admin) and returns a basic-auth
// client for it.
func vduUser(t *testing.T, admin *kivik.Client, name, password string, roles []string) *kivik.Client {
	t.Helper()
	if roles == nil {
		roles = []string{}
	}
	_, err := admin.DB("_users").Put(context.Background(), "org.couchdb.user:"+name, map[string]any{
		"name": name, "password": password, "roles": roles, "type": "user",
	})
	if err != nil {
		t.Fatalf("create user %s: %v", name, err)
	}
	t.Cleanup(func() {
		var doc map[string]any
		db := admin.DB("_users")
		if db.Get(context.Background(), "org.couchdb.user:"+name).ScanDoc(&doc) == nil {
			_, _ = db.Delete(context.Background(), "org.couchdb.user:"+name, doc["_rev"].(string))
		}
	})
	opts := couchtest.Options(t)
	c, err := couch.NewClient(couch.Options{URL: opts.URL, Username: name, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// vduDB is a fresh control database with the validation installed,
// the admin's handle on it and a non-admin member's ("device") handle.
type vduDB struct {
	admin             *kivik.Client
	db                *kivik.DB // admin
	device            *kivik.DB // member, no roles
	deviceName, devPW string
}

func vduNewDB(t *testing.T, writerRole string, sec *kivik.Security) vduDB {
	t.Helper()
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	name := "vdu-" + randomHex(t, 6)
	device := vduUser(t, admin, name, "pw-"+name, nil)
	if sec == nil {
		sec = &kivik.Security{}
	}
	sec.Members.Names = append(sec.Members.Names, name)
	if err := db.SetSecurity(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	if err := InstallValidation(context.Background(), db, writerRole); err != nil {
		t.Fatal(err)
	}
	return vduDB{admin: admin, db: db, device: device.DB(db.Name()), deviceName: name, devPW: "pw-" + name}
}

// vduRaw sends a JSON request as user:password and returns status and body.
func vduRaw(t *testing.T, method, path, user, password, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, couchtest.Options(t).URL+path, bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth(user, password)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, readAll(t, resp)
}

// vduDeviceUpdate is update for a device on PouchDB Server: there the function
// runs against the current revision before the _rev check, so a write based
// on a stale revision that the daemon changed meanwhile is refused with 403
// instead of 409 (CouchDB 3 checks _rev first and answers 409). A device
// therefore re-reads after a 403 and retries if the revision moved.
func vduDeviceUpdate(t *testing.T, db *kivik.DB, id string, fn func(map[string]any)) {
	t.Helper()
	for range 20 {
		doc := get(t, db, id)
		fn(doc)
		err := vduPut(db, doc)
		switch {
		case err == nil:
			return
		case kivik.HTTPStatus(err) == http.StatusConflict:
		case kivik.HTTPStatus(err) == http.StatusForbidden && get(t, db, id)["_rev"] != doc["_rev"]:
		default:
			t.Fatalf("device update %s: %v", id, err)
		}
	}
	t.Fatalf("device update %s: kept conflicting", id)
}

// forbidden asserts err is the function's refusal naming field.
func vduForbidden(t *testing.T, what string, err error, field string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: accepted, want forbidden", what)
		return
	}
	if s := kivik.HTTPStatus(err); s != http.StatusForbidden {
		t.Errorf("%s: status %d (%v), want 403", what, s, err)
		return
	}
	if !strings.Contains(err.Error(), "docstate: ") || !strings.Contains(err.Error(), field) {
		t.Errorf("%s: %v, want a docstate reason naming %q", what, err, field)
	}
}

func vduPut(db *kivik.DB, doc map[string]any) error {
	_, err := db.Put(context.Background(), doc["_id"].(string), doc)
	return err
}

// vduConfirmingDoc is a device document as docstate leaves it in confirming.
func vduConfirmingDoc(t *testing.T, id string) map[string]any {
	doc := newDevice(t, id, "val@example.test").doc()
	doc["state"] = StateConfirming
	doc[FieldCodeHash] = strings.Repeat("a", 64)
	doc[FieldCodeExpires] = time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	doc[FieldSends] = 1
	doc[FieldFailedAttempts] = 0
	doc[FieldMessageID] = "m@example.test"
	doc["docstate"] = map[string]any{"wake_at": "2030-01-01T00:00:00Z", "history": []any{"x", 1.5, nil, true}}
	return doc
}

func TestValidationCreate(t *testing.T) {
	t.Parallel()
	v := vduNewDB(t, "", nil)

	ok := newDevice(t, "dev-ok", "a@example.test").doc()
	if err := vduPut(v.device, ok); err != nil {
		t.Fatalf("device creates a valid new document: %v", err)
	}
	// A document that the daemon will refuse as invalid is still the
	// device's to create: the function checks fields, not values.
	if err := vduPut(v.device, map[string]any{"_id": "dev-bare", "type": "device", "state": "new"}); err != nil {
		t.Fatalf("device creates a bare new document: %v", err)
	}

	cases := []struct {
		name, field string
		mod         func(map[string]any)
	}{
		{"failed_attempts", "failed_attempts", func(d map[string]any) { d[FieldFailedAttempts] = 0 }},
		{"docstate", "docstate", func(d map[string]any) { d["docstate"] = map[string]any{"claim": nil} }},
		{"code_hash", "code_hash", func(d map[string]any) { d[FieldCodeHash] = "00" }},
		{"sends", "sends", func(d map[string]any) { d[FieldSends] = -100 }},
		{"confirm_attempt", "confirm_attempt", func(d map[string]any) { d[FieldConfirmAttempt] = "12345678" }},
		{"confirm_link", "confirm_link", func(d map[string]any) { d[FieldConfirmLink] = "00" }},
		{"state active", "state", func(d map[string]any) { d["state"] = StateActive }},
		{"state confirming", "state", func(d map[string]any) { d["state"] = StateConfirming }},
		{"no state", "state", func(d map[string]any) { delete(d, "state") }},
		{"type other", "type", func(d map[string]any) { d["type"] = "order" }},
		{"no type", "type", func(d map[string]any) { delete(d, "type") }},
		{"address id", "_id", func(d map[string]any) { d["_id"] = "device-address:x" }},
		{"address doc", "_id", func(d map[string]any) {
			for k := range d {
				delete(d, k)
			}
			d["_id"], d["type"], d["sends"] = "device-address:y", AddressDocType, []any{}
		}},
		{"attachment", "_attachments", func(d map[string]any) {
			d["_attachments"] = map[string]any{"a.txt": map[string]any{"content_type": "text/plain", "data": "aGk="}}
		}},
	}
	for i, c := range cases {
		doc := newDevice(t, "dev-bad-"+itoa(i), "b@example.test").doc()
		c.mod(doc)
		vduForbidden(t, "create with "+c.name, vduPut(v.device, doc), c.field)
	}
	// _bulk_docs goes through the same function.
	bad := newDevice(t, "dev-bulk", "c@example.test").doc()
	bad[FieldFailedAttempts] = 0
	// kivik reports every per-document error but "conflict" as 500; the
	// body says {"error":"forbidden"} (see TestValidationForbiddenBody).
	res, err := v.device.BulkDocs(context.Background(), []any{bad})
	if err != nil || len(res) != 1 || res[0].Error == nil ||
		!strings.Contains(res[0].Error.Error(), "docstate: field failed_attempts") {
		t.Errorf("_bulk_docs with failed_attempts: %v %+v", err, res)
	}

	// Design documents are refused before the function runs (PouchDB
	// Server: 401 from its security layer; CouchDB 3: 403).
	err = vduPut(v.device, map[string]any{"_id": "_design/evil", "validate_doc_update": "function(){}"})
	if !couch.IsUnauthorized(err) {
		t.Errorf("device writes a design doc: %v, want 401/403", err)
	}
	t.Logf("design doc by a member: %d %v", kivik.HTTPStatus(err), err)

	// The admin writes anything.
	adminDoc := newDevice(t, "dev-admin", "d@example.test").doc()
	adminDoc[FieldFailedAttempts], adminDoc["state"] = 3, StateActive
	if err := vduPut(v.db, adminDoc); err != nil {
		t.Errorf("admin creates a device doc with daemon fields: %v", err)
	}
	if err := vduPut(v.db, map[string]any{"_id": "device-address:z", "type": AddressDocType, "sends": []any{}}); err != nil {
		t.Errorf("admin creates an address doc: %v", err)
	}
	if err := vduPut(v.db, map[string]any{"_id": "no-type"}); err != nil {
		t.Errorf("admin creates a doc without type: %v", err)
	}
}

// TestValidationForbiddenBody records what PouchDB Server answers for a
// refusal: 403 {"error":"forbidden","reason":"docstate: ..."}, as CouchDB 3.
func TestValidationForbiddenBody(t *testing.T) {
	t.Parallel()
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	name := "vdu-raw-" + randomHex(t, 6)
	vduUser(t, admin, name, "pw", nil)
	if err := db.SetSecurity(context.Background(), &kivik.Security{Members: kivik.Members{Names: []string{name}}}); err != nil {
		t.Fatal(err)
	}
	if err := InstallValidation(context.Background(), db, ""); err != nil {
		t.Fatal(err)
	}
	const reason = "docstate: field failed_attempts may not be written when creating a device document"
	status, text := vduRaw(t, http.MethodPut, "/"+db.Name()+"/dev-raw", name, "pw",
		`{"type":"device","state":"new","failed_attempts":0}`)
	var got map[string]any
	if err := json.Unmarshal([]byte(text), &got); err != nil {
		t.Fatalf("body %q: %v", text, err)
	}
	want := map[string]any{"error": "forbidden", "reason": reason}
	if status != http.StatusForbidden || mustJSON(got) != mustJSON(want) {
		t.Fatalf("refusal: %d %s, want 403 %s", status, text, mustJSON(want))
	}
	t.Logf("PUT refusal: %d %s", status, text)

	// _bulk_docs: 201 with a per-document error of the same shape.
	status, text = vduRaw(t, http.MethodPost, "/"+db.Name()+"/_bulk_docs", name, "pw",
		`{"docs":[{"_id":"dev-raw","type":"device","state":"new","failed_attempts":0}]}`)
	var rows []map[string]any
	if err := json.Unmarshal([]byte(text), &rows); err != nil {
		t.Fatalf("body %q: %v", text, err)
	}
	wantRows := []map[string]any{{"id": "dev-raw", "error": "forbidden", "reason": reason}}
	if status != http.StatusCreated || mustJSON(rows) != mustJSON(wantRows) {
		t.Fatalf("_bulk_docs refusal: %d %s, want 201 %s", status, text, mustJSON(wantRows))
	}
	t.Logf("_bulk_docs refusal: %d %s", status, text)
}

func TestValidationUpdate(t *testing.T) {
	t.Parallel()
	v := vduNewDB(t, "", nil)
	ctx := context.Background()

	// deviceEdit reads the doc as the device, applies fn and writes it back.
	deviceEdit := func(id string, fn func(map[string]any)) error {
		var doc map[string]any
		if err := v.device.Get(ctx, id).ScanDoc(&doc); err != nil {
			t.Fatalf("device reads %s: %v", id, err)
		}
		fn(doc)
		return vduPut(v.device, doc)
	}

	put(t, v.db, vduConfirmingDoc(t, "dev-c"))
	if err := deviceEdit("dev-c", func(d map[string]any) { d[FieldConfirmAttempt] = "1234 5678" }); err != nil {
		t.Fatalf("confirm_attempt in confirming: %v", err)
	}
	if err := deviceEdit("dev-c", func(d map[string]any) { d[FieldConfirmAttempt] = "87654321" }); err != nil {
		t.Fatalf("changing confirm_attempt in confirming: %v", err)
	}
	if err := deviceEdit("dev-c", func(d map[string]any) { delete(d, FieldConfirmAttempt); d[FieldResendRequested] = true }); err != nil {
		t.Fatalf("resend_requested in confirming: %v", err)
	}
	// Rewriting the document unchanged is allowed (deep-equal, any key order).
	if err := deviceEdit("dev-c", func(map[string]any) {}); err != nil {
		t.Fatalf("unchanged write: %v", err)
	}

	cases := []struct {
		field string
		mod   func(map[string]any)
	}{
		{FieldFailedAttempts, func(d map[string]any) { d[FieldFailedAttempts] = -1000 }},
		{FieldFailedAttempts, func(d map[string]any) { delete(d, FieldFailedAttempts) }},
		{FieldCodeExpires, func(d map[string]any) { d[FieldCodeExpires] = "2999-01-01T00:00:00Z" }},
		{"state", func(d map[string]any) { d["state"] = StateActive }},
		{"state", func(d map[string]any) { d["state"] = StateNew }},
		{FieldOwner, func(d map[string]any) { d[FieldOwner] = "mallory@example.test" }},
		{"docstate", func(d map[string]any) { d["docstate"] = map[string]any{} }},
		{"docstate", func(d map[string]any) { // deep change: one array element
			d["docstate"].(map[string]any)["history"].([]any)[2] = false
		}},
		{FieldCodeHash, func(d map[string]any) { d[FieldCodeHash] = strings.Repeat("b", 64) }},
		{FieldCodeHash, func(d map[string]any) { delete(d, FieldCodeHash) }},
		{FieldLinkHash, func(d map[string]any) { d[FieldLinkHash] = "00" }},
		{FieldConfirmLink, func(d map[string]any) { d[FieldConfirmLink] = "00" }},
		{FieldCouchUser, func(d map[string]any) { d[FieldCouchUser] = "admin" }},
		{FieldCredentials, func(d map[string]any) { d[FieldCredentials].(map[string]any)["iterations"] = 1 }},
		{"type", func(d map[string]any) { d["type"] = "order" }},
		{FieldRevokeRequested, func(d map[string]any) { d[FieldRevokeRequested] = true }},
		{"_deleted", func(d map[string]any) { d["_deleted"] = true }},
	}
	for _, c := range cases {
		vduForbidden(t, "update "+c.field, deviceEdit("dev-c", c.mod), c.field)
	}
	doc := get(t, v.db, "dev-c")
	if _, err := v.device.Delete(ctx, "dev-c", doc["_rev"].(string)); err == nil {
		t.Error("device deleted its document")
	} else {
		vduForbidden(t, "DELETE", err, "_deleted")
	}

	// revoke_requested: only while active; confirm_attempt no longer then.
	active := newDevice(t, "dev-a", "e@example.test").doc()
	active["state"], active[FieldCouchUser] = StateActive, "device-x"
	put(t, v.db, active)
	if err := deviceEdit("dev-a", func(d map[string]any) { d[FieldRevokeRequested] = true }); err != nil {
		t.Fatalf("revoke_requested in active: %v", err)
	}
	vduForbidden(t, "confirm_attempt in active",
		deviceEdit("dev-a", func(d map[string]any) { d[FieldConfirmAttempt] = "1" }), FieldConfirmAttempt)
	vduForbidden(t, "resend_requested in active",
		deviceEdit("dev-a", func(d map[string]any) { d[FieldResendRequested] = true }), FieldResendRequested)
	vduForbidden(t, "revoked_at in active",
		deviceEdit("dev-a", func(d map[string]any) { d[FieldRevokedAt] = "2020-01-01T00:00:00Z" }), FieldRevokedAt)

	// Terminal states take no requests at all, not even removing one.
	revoked := newDevice(t, "dev-r", "f@example.test").doc()
	revoked["state"], revoked[FieldRevokeRequested] = StateRevoked, true
	put(t, v.db, revoked)
	vduForbidden(t, "remove revoke_requested in revoked",
		deviceEdit("dev-r", func(d map[string]any) { delete(d, FieldRevokeRequested) }), FieldRevokeRequested)

	// Replicated writes (new_edits=false) go through the function too: a
	// device's revision that resets failed_attempts is refused. (That one
	// with only an attempt passes the function; TestReplicatedUpdateWithValidation
	// shows what PouchDB Server then does with it.)
	update(t, v.db, "dev-c", func(d map[string]any) { d[FieldFailedAttempts] = 3 })
	status, text := vduReplicate(t, v.db, "dev-c", v.deviceName, v.devPW, func(d map[string]any) {
		d[FieldConfirmAttempt] = "12345678"
		d[FieldFailedAttempts] = 0
	})
	if status != http.StatusCreated || !strings.Contains(text, `"error":"forbidden"`) ||
		!strings.Contains(text, "docstate: field failed_attempts") {
		t.Errorf("replicated reset of failed_attempts: %d %s", status, text)
	}
	if got := get(t, v.db, "dev-c")[FieldFailedAttempts]; got != 3.0 {
		t.Errorf("failed_attempts %v after a refused replicated reset, want 3", got)
	}

	// Documents of other types, and documents that lost their type.
	put(t, v.db, map[string]any{"_id": "device-address:q", "type": AddressDocType, "sends": []any{}})
	vduForbidden(t, "reset an address doc", deviceEdit("device-address:q", func(d map[string]any) { d["sends"] = []any{} }), "_id")
	put(t, v.db, map[string]any{"_id": "order-1", "type": "order", "state": "new"})
	vduForbidden(t, "turn an order into a device",
		deviceEdit("order-1", func(d map[string]any) { d["type"] = DocType }), "type")

	// The admin can still change everything, and delete.
	update(t, v.db, "dev-c", func(d map[string]any) {
		d[FieldFailedAttempts], d["state"], d["docstate"] = 4, StateLocked, map[string]any{"x": 1}
	})
	update(t, v.db, "device-address:q", func(d map[string]any) { d["sends"] = []any{map[string]any{"at": "x"}} })
	doc = get(t, v.db, "dev-c")
	if _, err := v.db.Delete(ctx, "dev-c", doc["_rev"].(string)); err != nil {
		t.Fatalf("admin deletes: %v", err)
	}
	// Over the deleted document a device may create anew, as "new" only.
	recreated := newDevice(t, "dev-c", "g@example.test").doc()
	recreated[FieldFailedAttempts] = 0
	vduForbidden(t, "recreate with failed_attempts", vduPut(v.device, recreated), FieldFailedAttempts)
	delete(recreated, FieldFailedAttempts)
	if err := vduPut(v.device, recreated); err != nil {
		t.Fatalf("recreate a deleted device doc as new: %v", err)
	}
}

// TestValidationPrivilegedWriters: the writer role and database admins pass;
// a member without them does not.
func TestValidationPrivilegedWriters(t *testing.T) {
	t.Parallel()
	admin := couchtest.Client(t)
	suffix := randomHex(t, 6)
	writer := vduUser(t, admin, "vdu-writer-"+suffix, "pw1", []string{"docstate"})
	dbAdmin := vduUser(t, admin, "vdu-dbadmin-"+suffix, "pw2", nil)
	v := vduNewDB(t, "docstate", &kivik.Security{
		Admins:  kivik.Members{Names: []string{"vdu-dbadmin-" + suffix}},
		Members: kivik.Members{Names: []string{"vdu-writer-" + suffix}},
	})
	put(t, v.db, vduConfirmingDoc(t, "dev-p"))
	for name, db := range map[string]*kivik.DB{"writer role": writer.DB(v.db.Name()), "db admin": dbAdmin.DB(v.db.Name())} {
		update(t, db, "dev-p", func(d map[string]any) { d[FieldFailedAttempts] = d[FieldFailedAttempts].(float64) + 1 })
		if err := vduPut(db, map[string]any{"_id": "device-address:" + name, "type": AddressDocType}); err != nil {
			t.Errorf("%s creates an address doc: %v", name, err)
		}
	}
	if got := get(t, v.db, "dev-p")[FieldFailedAttempts]; got != 2.0 {
		t.Fatalf("failed_attempts %v, want 2", got)
	}
	var doc map[string]any
	_ = v.device.Get(context.Background(), "dev-p").ScanDoc(&doc)
	doc[FieldFailedAttempts] = 0.0
	vduForbidden(t, "member without the role", vduPut(v.device, doc), FieldFailedAttempts)

	// Without a writer role the role no longer helps.
	if err := InstallValidation(context.Background(), v.db, ""); err != nil {
		t.Fatal(err)
	}
	var wdoc map[string]any
	wdb := writer.DB(v.db.Name())
	_ = wdb.Get(context.Background(), "dev-p").ScanDoc(&wdoc)
	wdoc[FieldFailedAttempts] = 0.0
	vduForbidden(t, "writer role after its removal", vduPut(wdb, wdoc), FieldFailedAttempts)
}

func TestInstallValidationIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	rev := func() string { return get(t, db, DesignDocID)["_rev"].(string) }

	if err := InstallValidation(ctx, db, ""); err != nil {
		t.Fatal(err)
	}
	r1 := rev()
	if err := InstallValidation(ctx, db, ""); err != nil {
		t.Fatal(err)
	}
	if r2 := rev(); r2 != r1 {
		t.Fatalf("second install wrote the design doc again: %s → %s", r1, r2)
	}
	if err := InstallValidation(ctx, db, "docstate"); err != nil {
		t.Fatal(err)
	}
	r3 := rev()
	ddoc := get(t, db, DesignDocID)
	if r3 == r1 || ddoc["validate_doc_update"] != ValidateDocUpdate("docstate") ||
		!strings.Contains(ddoc["validate_doc_update"].(string), `var WRITER_ROLE = "docstate";`) {
		t.Fatalf("changed writer role: rev %s → %s, source:\n%v", r1, r3, ddoc["validate_doc_update"])
	}
	// A design doc someone edited (an extra field, an old function) is
	// brought back to what this version installs.
	update(t, db, DesignDocID, func(d map[string]any) { d["validate_doc_update"] = "function(){}"; d["views"] = map[string]any{} })
	if err := InstallValidation(ctx, db, "docstate"); err != nil {
		t.Fatal(err)
	}
	ddoc = get(t, db, DesignDocID)
	if _, ok := ddoc["views"]; ok || ddoc["validate_doc_update"] != ValidateDocUpdate("docstate") || ddoc["language"] != "javascript" {
		t.Fatalf("edited design doc not restored: %s", mustJSON(ddoc))
	}
	// A deleted design doc is recreated.
	if _, err := db.Delete(ctx, DesignDocID, ddoc["_rev"].(string)); err != nil {
		t.Fatal(err)
	}
	if err := InstallValidation(ctx, db, ""); err != nil {
		t.Fatal(err)
	}
	if get(t, db, DesignDocID)["validate_doc_update"] != ValidateDocUpdate("") {
		t.Fatal("deleted design doc not recreated")
	}

	// Daemons racing: every one succeeds, the content is one of theirs.
	db2 := couchtest.NewDB(t, admin)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Go(func() {
			role := ""
			if i%2 == 1 {
				role = "docstate"
			}
			errs <- InstallValidation(ctx, db2, role)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("racing install: %v", err)
		}
	}
	if src := get(t, db2, DesignDocID)["validate_doc_update"]; src != ValidateDocUpdate("") && src != ValidateDocUpdate("docstate") {
		t.Fatalf("after the race: %v", src)
	}
}

func vduAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// vduReplicate writes, as user, a revision of id that extends the current
// one with mod applied, the way replication does (_bulk_docs with
// new_edits=false), and returns the new rev with the server's answer.
func vduReplicate(t *testing.T, db *kivik.DB, id, user, password string, mod func(map[string]any)) (int, string) {
	t.Helper()
	doc := get(t, db, id)
	gen, hash, _ := strings.Cut(doc["_rev"].(string), "-")
	next := vduAtoi(t, gen) + 1
	newHash := randomHex(t, 16)
	doc["_rev"] = itoa(next) + "-" + newHash
	doc["_revisions"] = map[string]any{"start": next, "ids": []string{newHash, hash}}
	mod(doc)
	return vduRaw(t, http.MethodPost, "/"+db.Name()+"/_bulk_docs", user, password,
		mustJSON(map[string]any{"new_edits": false, "docs": []any{doc}}))
}

// vduIsPouchDB reports whether the test server is PouchDB Server.
func vduIsPouchDB(t *testing.T) bool {
	t.Helper()
	opts := couchtest.Options(t)
	_, text := vduRaw(t, http.MethodGet, "/", opts.Username, opts.Password, "")
	return strings.Contains(text, "express-pouchdb")
}

// TestReplicatedUpdateWithValidation characterises a PouchDB Server defect
// (pouchdb-validation 4.2.0): with any validate_doc_update installed, it
// replaces a replicated revision's _revisions with those of the stored
// document before storing it, so a replicated update (new_edits=false) of an
// existing document is answered 201 [] and silently dropped, even for
// admins. Replicated creations still work. CouchDB 3 stores the update.
func TestReplicatedUpdateWithValidation(t *testing.T) {
	t.Parallel()
	opts := couchtest.Options(t)
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	put(t, db, newDevice(t, "dev-rep", "rep@example.test").doc())
	replicateAttempt := func(attempt string) bool {
		t.Helper()
		status, text := vduReplicate(t, db, "dev-rep", opts.Username, opts.Password,
			func(d map[string]any) { d[FieldConfirmAttempt] = attempt })
		if status != http.StatusCreated || strings.Contains(text, "error") {
			t.Fatalf("replicated update: %d %s", status, text)
		}
		return get(t, db, "dev-rep")[FieldConfirmAttempt] == attempt
	}
	if !replicateAttempt("1") {
		t.Fatal("replicated update without validation not stored")
	}
	if err := InstallValidation(context.Background(), db, ""); err != nil {
		t.Fatal(err)
	}
	stored := replicateAttempt("2")
	if pouch := vduIsPouchDB(t); pouch == stored {
		t.Fatalf("replicated update with validation: stored %v on PouchDB Server %v; expected stored only on CouchDB", stored, pouch)
	}
	// A replicated creation is stored either way.
	doc := newDevice(t, "dev-rep-new", "rep@example.test").doc()
	doc["_rev"] = "1-" + randomHex(t, 16)
	status, text := vduRaw(t, http.MethodPost, "/"+db.Name()+"/_bulk_docs", opts.Username, opts.Password,
		mustJSON(map[string]any{"new_edits": false, "docs": []any{doc}}))
	if status != http.StatusCreated || strings.Contains(text, "error") || get(t, db, "dev-rep-new")["_rev"] != doc["_rev"] {
		t.Fatalf("replicated creation: %d %s", status, text)
	}
}

func TestValidateDocUpdateSource(t *testing.T) {
	for _, role := range []string{"", "docstate", `we"ird\role`} {
		src := ValidateDocUpdate(role)
		if !strings.HasPrefix(src, "function (newDoc, oldDoc, userCtx, secObj) {") || strings.Contains(src, writerRolePlaceholder) {
			t.Fatalf("role %q: source head %q", role, src[:60])
		}
	}
	if !strings.Contains(ValidateDocUpdate(`we"ird\role`), `var WRITER_ROLE = "we\"ird\\role";`) {
		t.Fatal("writer role not quoted as a JavaScript string")
	}
}

// TestFullLoopWithValidation: the daemon (admin) drives a device from new to
// active and revoked with the validation installed, while the device writes
// as a non-admin member: creation, a wrong code, a reset attempt that is
// refused, the right code, revocation.
func TestFullLoopWithValidation(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), nil)
	admin := couchtest.Client(t)
	name := "vdu-loop-" + randomHex(t, 6)
	devClient := vduUser(t, admin, name, "pw-loop", nil)
	if err := f.db.SetSecurity(context.Background(), &kivik.Security{Members: kivik.Members{Names: []string{name}}}); err != nil {
		t.Fatal(err)
	}
	if err := InstallValidation(context.Background(), f.db, ""); err != nil {
		t.Fatal(err)
	}
	asDevice := devClient.DB(f.db.Name())
	f.start(t, nil)

	dv := newDevice(t, "dev-vdu-loop", "loop@example.test")
	put(t, asDevice, dv.doc())
	waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)
	mails := mock.WaitReceived(t, 1, 10*time.Second)
	code := codeIn(t, readBody(t, mails[0]))

	wrong := "00000000"
	if wrong == code {
		wrong = "11111111"
	}
	vduDeviceUpdate(t, asDevice, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = wrong })
	workflowtest.Eventually(t, 10*time.Second, "wrong attempt counted", func() (bool, string) {
		doc := get(t, f.db, dv.id)
		return doc[FieldFailedAttempts] == 1.0 && doc[FieldConfirmAttempt] == nil && doc[FieldPendingCheck] == nil, mustJSON(doc)
	})
	settled(t, f.db, dv.id)
	var doc map[string]any
	if err := asDevice.Get(context.Background(), dv.id).ScanDoc(&doc); err != nil {
		t.Fatal(err)
	}
	doc[FieldFailedAttempts] = 0
	vduForbidden(t, "device resets failed_attempts", vduPut(asDevice, doc), FieldFailedAttempts)

	vduDeviceUpdate(t, asDevice, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = code })
	doc = waitState(t, f.db, dv.id, StateActive, 30*time.Second)
	if doc[FieldCouchUser] != UserName(dv.id, dv.creds.Salt) {
		t.Fatalf("active doc: %s", mustJSON(doc))
	}
	if got, _ := session(t, UserName(dv.id, dv.creds.Salt), dv.password); got == "" {
		t.Fatal("device cannot log in")
	}
	vduDeviceUpdate(t, asDevice, dv.id, func(d map[string]any) { d[FieldRevokeRequested] = true })
	waitState(t, f.db, dv.id, StateRevoked, 30*time.Second)
}

// EnsureValidation tells a write (missing, edited) from a no-op, which the
// daemon's periodic provisioning turns into a log line and a metric.
func TestEnsureValidationReportsWrites(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := couchtest.NewDB(t, couchtest.Client(t))
	step := func(what string, want bool) {
		t.Helper()
		written, err := EnsureValidation(ctx, db, "")
		if err != nil || written != want {
			t.Fatalf("%s: written %v err %v, want written %v", what, written, err, want)
		}
	}
	step("missing", true)
	step("in place", false)
	update(t, db, DesignDocID, func(d map[string]any) { d["validate_doc_update"] = "function(){}" })
	step("edited", true)
	step("in place again", false)
	if _, err := db.Delete(ctx, DesignDocID, get(t, db, DesignDocID)["_rev"].(string)); err != nil {
		t.Fatal(err)
	}
	step("deleted", true)
}
