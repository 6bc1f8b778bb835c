package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/docstate/docstate/internal/identity"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// Pairing through the device's own CouchDB user (Options.Pairing =
// PairingUsers; see doc.go "Pairing through _users").
//
// A device signs itself up: it creates its own _users document, which
// CouchDB lets anyone do with no roles and lets only that user and admins
// read, with state "pairing" and a pairing request in it. The daemon
// follows _users and mirrors each request into a trusted device document in
// the control database, which in this mode only server admins can read or
// write: attempt counters, hashes, expiry and state live there, where no
// device reaches them. The device reads how it stands from pairing_status on
// its own user document, which only the daemon writes. Once the owner
// confirms, the user gets the owner's role and the owner a private control
// database (UserDBName) secured to that role, where the user's devices are
// listed and revoked by replication.

// Pairing modes.
const (
	// PairingControl is the older mode: devices write their device
	// documents into a shared control database (see doc.go).
	PairingControl = "control"
	// PairingUsers pairs devices through their own _users documents.
	PairingUsers = identity.PairingUsers
)

// Names of the users mode.
const (
	// UserState is the state a device's _users document carries while it
	// wants to pair. _users holds other programs' users too: documents
	// without a state are not the daemon's.
	UserState = "pairing"
	// FieldPairing is the request on the user document: owner and
	// device_name at sign-up, later confirm_attempt or resend_requested.
	FieldPairing = "pairing"
	// FieldPairingStatus is what the daemon reports on the user document:
	// state, and as they apply code_expires, failed_attempts,
	// last_attempt_error, resend_denied, reason, control_db, control_url.
	FieldPairingStatus = "pairing_status"
	// FieldMirroredRev is the user document revision whose requests a
	// trusted device document last took, so a repeated mirror run does not
	// count one attempt twice.
	FieldMirroredRev = "mirrored_rev"
	// FieldPairingMode marks trusted device documents of the users mode.
	FieldPairingMode = identity.FieldPairingMode

	trustedPrefix = "device:"
	// UserDBPrefix starts the name of every per-owner control database.
	UserDBPrefix = identity.UserDBPrefix
	// DeviceInfoType is the type of the device list entries in a per-owner
	// control database; RevokeRequestType of a device's request to revoke
	// another (or itself) there.
	DeviceInfoType    = identity.DeviceInfoType
	RevokeRequestType = "revoke_request"
)

// TrustedID is the id of user's trusted device document in the control
// database.
func TrustedID(user string) string { return trustedPrefix + user }

// UserDBName is owner's private control database: "userctl-" and the 40 hex
// digits of OwnerRole, so the address is in no database name.
func UserDBName(owner string) string { return identity.UserDBName(owner) }

// roleOfUserDB returns the owner role a per-owner control database admits.
func roleOfUserDB(db string) (string, bool) { return identity.RoleOfUserDB(db) }

// pairingRequest is what a device writes under "pairing".
type pairingRequest struct {
	Owner          string  `json:"owner"`
	DeviceName     string  `json:"device_name"`
	ConfirmAttempt *string `json:"confirm_attempt,omitempty"`
	Resend         *bool   `json:"resend_requested,omitempty"`
}

// checkUserName accepts the user names the daemon pairs: 1 to 64 of
// a-z A-Z 0-9 . _ @ + -, which keeps them safe in ids, logs and URLs.
func checkUserName(s string) error {
	if s == "" || len(s) > 64 {
		return fmt.Errorf("must be 1 to 64 characters, got %d", len(s))
	}
	for i := range len(s) {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("._@+-", c) >= 0) {
			return fmt.Errorf("contains %q: only letters, digits and . _ @ + - are paired", c)
		}
	}
	return nil
}

// RegisterUsers registers the handler of device user documents, for the
// engine that follows _users (with workflow.Options.PassStateless, since
// _users holds other users too).
func (d *Devices) RegisterUsers(reg *workflow.Registry) error {
	return reg.Register(workflow.Spec{Type: "user", State: UserState, Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(d.handleUser)})
}

// RegisterUserDBs registers the handlers of the per-owner control
// databases, for a supervisor over UserDBPrefix + "*".
func (d *Devices) RegisterUserDBs(reg *workflow.Registry) error {
	return reg.Register(workflow.Spec{Type: RevokeRequestType, State: StateNew, Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(d.handleRevokeRequest)})
}

// handleUser mirrors a device user's pairing request into its trusted
// device document, and keeps the user's roles to what the daemon granted.
func (d *Devices) handleUser(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	user, ok := strings.CutPrefix(doc.ID, "org.couchdb.user:")
	var name string
	if _, err := doc.Field("name", &name); err != nil || !ok || name != user {
		return workflow.Stay(), nil // not a user document CouchDB would accept
	}
	status := func(state, reason string) workflow.Result {
		return workflow.Stay().Set(FieldPairingStatus, map[string]any{"state": state, "reason": reason})
	}
	if err := checkUserName(user); err != nil {
		return status("invalid", "user name "+err.Error()), nil
	}
	if n := len(doc.Raw()); n > d.opts.MaxDocBytes {
		return status("invalid", fmt.Sprintf("user document is %d bytes, more than the limit of %d", n, d.opts.MaxDocBytes)), nil
	}
	var req pairingRequest
	if ok, err := doc.Field(FieldPairing, &req); err != nil || !ok {
		return status("invalid", "pairing must be an object {owner, device_name}"), nil
	}
	trusted, err := d.readTrusted(ctx, user)
	if err != nil {
		return workflow.Result{}, err
	}
	if r := d.guardRoles(doc, trusted); r != nil {
		return *r, nil
	}
	if trusted == nil {
		if err := CheckEmail(req.Owner); err != nil {
			return status("invalid", "pairing.owner "+err.Error()), nil
		}
		if err := checkDeviceName(req.DeviceName); err != nil {
			return status("invalid", "pairing.device_name "+err.Error()), nil
		}
		err := d.putTrusted(ctx, user, map[string]any{
			"_id": TrustedID(user), "type": DocType, "state": StateNew,
			FieldOwner: req.Owner, FieldDeviceName: req.DeviceName, FieldCouchUser: user,
			FieldPairingMode: PairingUsers, FieldMirroredRev: doc.Rev,
		})
		if err != nil {
			return workflow.Result{}, err
		}
		d.log.Info("pairing requested", "user", user, "trusted", TrustedID(user))
		return status("requested", ""), nil
	}
	if req.ConfirmAttempt == nil && req.Resend == nil {
		return workflow.Stay(), nil
	}
	// A request was made: hand it to the trusted document once, then take
	// it off the user document so the next one is a new write.
	cleared := req
	cleared.ConfirmAttempt, cleared.Resend = nil, nil
	done := workflow.Stay().Set(FieldPairing, cleared)
	var state, mirrored string
	_ = json.Unmarshal(trusted["state"], &state)
	_ = json.Unmarshal(trusted[FieldMirroredRev], &mirrored)
	if mirrored == doc.Rev {
		return done, nil // taken already by a run whose own write was lost
	}
	if state == StateNew {
		// The code is on its way (its status may be published before the
		// state is written): keep the request and look again shortly.
		return workflow.Stay().WakeAt(time.Now().Add(250 * time.Millisecond)), nil
	}
	if state != StateConfirming {
		return done.Set(FieldPairingStatus, d.statusOf(trusted, "requests are only taken while confirming")), nil
	}
	if req.ConfirmAttempt != nil {
		b, _ := json.Marshal(truncate(*req.ConfirmAttempt, maxAttemptLen+1))
		trusted[FieldConfirmAttempt] = b
	}
	if req.Resend != nil && *req.Resend {
		trusted[FieldResendRequested] = json.RawMessage("true")
	}
	trusted[FieldMirroredRev], _ = json.Marshal(doc.Rev)
	if _, err := d.opts.DB.Put(ctx, TrustedID(user), trusted); err != nil {
		// A conflict is the daemon's own handler writing meanwhile: the
		// engine runs this again on a fresh read.
		return workflow.Result{}, fmt.Errorf("hand the pairing request to %s: %w", TrustedID(user), err)
	}
	return done, nil
}

// guardRoles takes off roles the daemon did not grant. CouchDB refuses a
// user's own change of its roles; PouchDB Server lets it through, and this
// undoes it on the next run (a window of one run, which a test names).
func (d *Devices) guardRoles(doc *workflow.Doc, trusted map[string]json.RawMessage) *workflow.Result {
	var roles []string
	_, _ = doc.Field("roles", &roles)
	var want []string
	if trusted != nil {
		var state, owner string
		_ = json.Unmarshal(trusted["state"], &state)
		_ = json.Unmarshal(trusted[FieldOwner], &owner)
		if state == StateActive {
			want = []string{OwnerRole(owner)}
		}
	}
	if slices.Equal(roles, want) || (len(roles) == 0 && len(want) == 0) {
		return nil
	}
	d.log.Warn("user document holds roles the daemon did not grant; taking them off", "user", doc.ID, "roles", len(roles))
	if want == nil {
		want = []string{}
	}
	r := workflow.Stay().Set("roles", want)
	return &r
}

// statusFields are the trusted document's fields a device sees in its
// pairing_status: how it stands, never a hash or a counter it could use.
func statusFields() []string {
	return []string{"state", FieldCodeExpires, FieldFailedAttempts, FieldLastAttemptError, FieldResendDenied,
		FieldSendDelayed, FieldReason, FieldControlDB, FieldControlURL}
}

// Fields of an active users-mode device: its owner's control database.
const (
	FieldControlDB  = "control_db"
	FieldControlURL = "control_url"
)

// publishing wraps a trusted document's handler so that what its run will
// write is published on the device's user document first: the device
// learns that a code went out, an attempt failed, or where its control
// database is. A terminal failure is published as state "error" with its
// reason. Publishing before the result is written errs on the early side;
// a run repeated after a lost write publishes the same status again.
func (d *Devices) publishing(h workflow.HandlerFunc) workflow.HandlerFunc {
	return func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		res, err := h(ctx, doc)
		if !d.usersMode(doc) {
			return res, err
		}
		if err != nil {
			if workflow.IsTerminal(err) {
				if perr := d.publish(ctx, doc, map[string]any{"state": "error", "reason": truncate(err.Error(), 500)}); perr != nil {
					return res, errors.Join(err, perr)
				}
			}
			return res, err
		}
		st := map[string]any{}
		for _, k := range statusFields() {
			var v any
			if ok, _ := doc.Field(k, &v); ok {
				st[k] = v
			}
		}
		set, unset := res.Changes()
		for _, k := range unset {
			delete(st, k)
		}
		for _, k := range statusFields() {
			if v, ok := set[k]; ok {
				st[k] = v
			}
		}
		st["state"] = doc.State
		if next := res.Next(); next != "" {
			st["state"] = next
		}
		if st["state"] == StateActive {
			// Published by the active handler, once the role is granted.
			return res, nil
		}
		if perr := d.publish(ctx, doc, st); perr != nil {
			return workflow.Result{}, perr
		}
		return res, nil
	}
}

// statusOf is the pairing_status for a trusted document.
func (d *Devices) statusOf(trusted map[string]json.RawMessage, note string) map[string]any {
	st := map[string]any{}
	for _, k := range statusFields() {
		if raw, ok := trusted[k]; ok {
			st[k] = raw
		}
	}
	if note != "" {
		st["note"] = note
	}
	return st
}

// readTrusted returns user's trusted device document, nil when there is
// none.
func (d *Devices) readTrusted(ctx context.Context, user string) (map[string]json.RawMessage, error) {
	var doc map[string]json.RawMessage
	err := d.opts.DB.Get(ctx, TrustedID(user)).ScanDoc(&doc)
	if couch.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", TrustedID(user), err)
	}
	return doc, nil
}

func (d *Devices) putTrusted(ctx context.Context, user string, doc map[string]any) error {
	_, err := d.opts.DB.Put(ctx, TrustedID(user), doc)
	if couch.IsConflict(err) {
		return fmt.Errorf("create %s: another run created it meanwhile: %w", TrustedID(user), err)
	}
	if err != nil {
		return fmt.Errorf("create %s: %w", TrustedID(user), err)
	}
	return nil
}

// publish writes status onto the device user's own _users document, where
// the device reads it. Only in users mode; a user document that is gone
// (the device gave up, or was revoked) is left gone.
func (d *Devices) publish(ctx context.Context, doc *workflow.Doc, status map[string]any) error {
	if !d.usersMode(doc) {
		return nil
	}
	var user string
	_, _ = doc.Field(FieldCouchUser, &user)
	b, err := json.Marshal(status)
	if err != nil {
		return err
	}
	err = d.updateUser(ctx, user, func(cur map[string]json.RawMessage) bool {
		if string(cur[FieldPairingStatus]) == string(b) {
			return false
		}
		cur[FieldPairingStatus] = b
		return true
	})
	if errors.Is(err, errUserGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("write the pairing status: %w", err)
	}
	return nil
}

// errUserGone: the device's _users document does not exist (any more).
var errUserGone = errors.New("the device's CouchDB user is gone")

// updateUser changes user's _users document with change (which reports
// whether it changed anything) and writes it back, redoing on 409.
func (d *Devices) updateUser(ctx context.Context, user string, change func(map[string]json.RawMessage) bool) error {
	users := d.opts.Client.DB(usersDB)
	id := userIDPrefix + user
	for range maxWriteTries {
		var cur map[string]json.RawMessage
		err := users.Get(ctx, id).ScanDoc(&cur)
		if couch.IsNotFound(err) {
			return fmt.Errorf("%s: %w", id, errUserGone)
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", id, err)
		}
		if !change(cur) {
			return nil
		}
		_, err = users.Put(ctx, id, cur)
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

// usersMode reports whether doc is a trusted document of the users mode.
func (d *Devices) usersMode(doc *workflow.Doc) bool {
	if d.opts.Pairing != PairingUsers {
		return false // a device of the control mode cannot opt itself in
	}
	var mode string
	_, _ = doc.Field(FieldPairingMode, &mode)
	return mode == PairingUsers
}

// grantRole gives the device's own user the owner's role, marking the
// entry as this device's. The user document must exist: the device made it.
func (d *Devices) grantRole(ctx context.Context, trustedID, user, role string) error {
	err := d.updateUser(ctx, user, func(cur map[string]json.RawMessage) bool {
		var roles []string
		var mark string
		_ = json.Unmarshal(cur["roles"], &roles)
		_ = json.Unmarshal(cur[userMarkField], &mark)
		if slices.Equal(roles, []string{role}) && mark == trustedID {
			return false
		}
		cur["roles"], _ = json.Marshal([]string{role})
		cur[userMarkField], _ = json.Marshal(trustedID)
		return true
	})
	if errors.Is(err, errUserGone) {
		return workflow.Terminal(err)
	}
	return err
}

// userDBSecurity admits the owner's role only: no names, no database
// admins (server admins, the daemon among them, always pass).
func userDBSecurity(role string) *kivik.Security {
	return &kivik.Security{Members: kivik.Members{Roles: []string{role}}}
}

// ProvisionUserDB creates owner's private control database if missing,
// sets its _security to the owner's role and reads it back, and installs its
// validation function. Idempotent, and what the healing loop re-applies.
// It reports whether anything had to change.
func (d *Devices) ProvisionUserDB(ctx context.Context, owner string) (changed bool, err error) {
	return d.provisionUserDB(ctx, UserDBName(owner), OwnerRole(owner))
}

func (d *Devices) provisionUserDB(ctx context.Context, name, role string) (bool, error) {
	changed := false
	db := d.opts.Client.DB(name)
	want := userDBSecurity(role)
	// _security first: a missing database answers 404 there, so an
	// existing one (every heal pass, nearly always) costs no existence
	// check of its own.
	cur, err := db.Security(ctx)
	if couch.IsNotFound(err) {
		if err := d.opts.Client.CreateDB(ctx, name); err != nil && !couch.IsPreconditionFailed(err) {
			return false, fmt.Errorf("create %s: %w", name, err)
		}
		changed = true
		cur, err = db.Security(ctx)
	}
	if err != nil {
		return changed, fmt.Errorf("read _security of %s: %w", name, err)
	}
	if !sameSecurity(cur, want) {
		if err := db.SetSecurity(ctx, want); err != nil {
			return changed, fmt.Errorf("set _security of %s: %w", name, err)
		}
		cur, err = db.Security(ctx)
		if err != nil {
			return changed, fmt.Errorf("read back _security of %s: %w", name, err)
		}
		if !sameSecurity(cur, want) {
			return changed, fmt.Errorf("_security of %s did not take", name)
		}
		changed = true
	}
	wrote, err := installDesign(ctx, db, UserDBDesignID, userDBValidateSource)
	if err != nil {
		return changed, err
	}
	return changed || wrote, nil
}

func sameSecurity(cur, want *kivik.Security) bool {
	norm := func(s []string) []string {
		if len(s) == 0 {
			return nil
		}
		return slices.Sorted(slices.Values(s))
	}
	return cur != nil && slices.Equal(norm(cur.Members.Roles), norm(want.Members.Roles)) &&
		slices.Equal(norm(cur.Members.Names), norm(want.Members.Names)) &&
		len(cur.Admins.Names) == 0 && len(cur.Admins.Roles) == 0
}

// putDeviceInfo writes (or updates) the device's entry in its owner's
// control database, where the owner's devices list each other.
func (d *Devices) putDeviceInfo(ctx context.Context, owner string, info map[string]any) error {
	db := d.opts.Client.DB(UserDBName(owner))
	id, _ := info["_id"].(string)
	for range maxWriteTries {
		var cur map[string]any
		err := db.Get(ctx, id).ScanDoc(&cur)
		if err != nil && !couch.IsNotFound(err) {
			return fmt.Errorf("read %s: %w", id, err)
		}
		body := map[string]any{}
		for k, v := range info {
			body[k] = v
		}
		if rev, _ := cur["_rev"].(string); rev != "" {
			if sameInfo(cur, body) {
				return nil // nothing changed: no revision for devices to replicate
			}
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

// handleRevokeRequest takes a device's request, written by replication into
// its owner's control database, to revoke one of the owner's devices. Only
// devices of the same owner can write there (_security), and only a device
// of that owner can be named: the target's trusted document must carry the
// database's role.
func (d *Devices) handleRevokeRequest(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	refuse := func(why string) (workflow.Result, error) {
		return workflow.Transition("refused").Set(FieldReason, why), nil
	}
	role, ok := roleOfUserDB(doc.DB().Name())
	if !ok {
		return refuse("not in a per-owner control database")
	}
	var target string
	if ok, err := doc.Field("target", &target); err != nil || !ok || checkUserName(target) != nil {
		return refuse("target must name a device's CouchDB user")
	}
	for range maxWriteTries {
		trusted, err := d.readTrusted(ctx, target)
		if err != nil {
			return workflow.Result{}, err
		}
		var owner, state string
		if trusted != nil {
			_ = json.Unmarshal(trusted[FieldOwner], &owner)
			_ = json.Unmarshal(trusted["state"], &state)
		}
		if trusted == nil || OwnerRole(owner) != role {
			return refuse("no device of this owner has that user")
		}
		switch state {
		case StateRevoked:
			return workflow.Transition("accepted"), nil
		case StateActive:
		default:
			return refuse("the device is " + state + ", not active")
		}
		trusted[FieldRevokeRequested] = json.RawMessage("true")
		_, err = d.opts.DB.Put(ctx, TrustedID(target), trusted)
		if couch.IsConflict(err) {
			continue
		}
		if err != nil {
			return workflow.Result{}, fmt.Errorf("request revocation on %s: %w", TrustedID(target), err)
		}
		d.log.Info("revocation requested by replication", "target", target, "request", doc.ID)
		return workflow.Transition("accepted").Set("accepted_at", stampOf(time.Now())), nil
	}
	return workflow.Result{}, errors.New("trusted device document kept changing")
}

// controlSecurity makes the control database the daemon's alone in users
// mode: a member role no user has. An empty members list would make it
// public on CouchDB.
func controlSecurity() *kivik.Security {
	return &kivik.Security{Members: kivik.Members{Roles: []string{"_admin"}}}
}

// ProvisionControl prepares the control database: its validation function
// and, in users mode, a _security that admits server admins only. It
// reports whether anything had to change; Followers.Heal calls it again.
func (d *Devices) ProvisionControl(ctx context.Context) (bool, error) {
	wrote, err := installDesign(ctx, d.opts.DB, DesignDocID, ValidateDocUpdate(""))
	if err != nil {
		return false, err
	}
	if d.opts.Pairing != PairingUsers {
		return wrote, nil
	}
	want := controlSecurity()
	cur, err := d.opts.DB.Security(ctx)
	if err != nil {
		return wrote, fmt.Errorf("read _security of %s: %w", d.opts.DB.Name(), err)
	}
	if sameSecurity(cur, want) {
		return wrote, nil
	}
	if err := d.opts.DB.SetSecurity(ctx, want); err != nil {
		return wrote, fmt.Errorf("set _security of %s: %w", d.opts.DB.Name(), err)
	}
	return true, nil
}

// sameInfo reports whether the stored entry cur already holds want.
func sameInfo(cur, want map[string]any) bool {
	a, _ := json.Marshal(want)
	var norm map[string]any
	_ = json.Unmarshal(a, &norm)
	for k, v := range norm {
		cv, _ := json.Marshal(cur[k])
		wv, _ := json.Marshal(v)
		if string(cv) != string(wv) {
			return false
		}
	}
	for k := range cur {
		if _, ok := norm[k]; !ok && !strings.HasPrefix(k, "_") {
			return false
		}
	}
	return true
}
