package devices

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// codeFields are cleared whenever a code stops being usable, so a
// finished document holds no hash to attack offline.
// They are functions, not variables: appending to a shared slice could
// alias.
func codeFields() []string {
	return []string{FieldCodeHash, FieldLinkHash, FieldCodeExpires, FieldPendingCheck}
}

// inputFields are the device's requests, consumed by every run that reads
// them.
func inputFields() []string {
	return []string{FieldConfirmAttempt, FieldConfirmLink, FieldResendRequested}
}

// changes collects field changes before the result's kind (stay or
// transition) is known: workflow.Result fixes that at construction.
type changes struct {
	set   map[string]any
	unset []string
}

func (c *changes) Set(k string, v any) *changes {
	if c.set == nil {
		c.set = map[string]any{}
	}
	c.set[k] = v
	return c
}

func (c *changes) Unset(fields ...string) *changes {
	c.unset = append(c.unset, fields...)
	return c
}

func (c *changes) apply(r workflow.Result) workflow.Result {
	for _, k := range c.unset {
		if _, ok := c.set[k]; !ok {
			r = r.Unset(k)
		}
	}
	for k, v := range c.set {
		r = r.Set(k, v)
	}
	return r
}

func unset(r workflow.Result, fields ...string) workflow.Result {
	for _, f := range fields {
		r = r.Unset(f)
	}
	return r
}

func stampOf(t time.Time) workflow.Stamp {
	return workflow.Stamp{Time: t.UTC().Truncate(time.Millisecond)}
}

// handleNew validates the request and sends the first code.
func (d *Devices) handleNew(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	req, err := d.parseRequest(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	var sends int
	if _, err := doc.Field(FieldSends, &sends); err != nil || sends < 0 {
		sends = 0
	}
	var c changes
	retryAt, err := d.send(ctx, doc, req, sends, &c)
	if err != nil {
		return workflow.Result{}, err
	}
	if !retryAt.IsZero() {
		return c.apply(workflow.Stay()).WakeAt(retryAt), nil
	}
	// Anything a device wrote into fields docstate owns is overwritten.
	c.Set(FieldFailedAttempts, 0).Unset(FieldLastAttemptError, FieldReason, FieldOwnerRole)
	if !d.usersMode(doc) {
		// In the users mode the daemon itself wrote couch_user, from the
		// name CouchDB authenticated.
		c.Unset(FieldCouchUser)
	}
	return c.apply(workflow.Transition(StateConfirming)), nil
}

// send derives a code for this claim, reserves a slot in the owner's
// address limit and in the global one, mails the code and returns the
// fields that record it. Its changes go into c. A non-zero retryAt means a
// limit says to wait until then; nothing was sent, and why is in
// c[FieldSendDelayed].
func (d *Devices) send(ctx context.Context, doc *workflow.Doc, req request, sends int, c *changes) (retryAt time.Time, err error) {
	if doc.Claim == nil {
		return time.Time{}, errors.New("devices: handler registered without a claim (must be Unsafe)")
	}
	redrive := ""
	if e := doc.Meta().Error; e != nil {
		redrive = e.At.UTC().Format(time.RFC3339Nano)
	}
	code, token, messageID := d.secrets(issue{
		docID: doc.ID, claimKey: doc.Claim.Key, sends: itoa(sends), redrive: redrive,
		owner: req.owner, salt: req.creds.Salt,
	})
	now := time.Now()
	allowed, retryAt, limit, err := d.reserve(ctx, req.owner, messageID, now)
	if err != nil {
		return time.Time{}, err
	}
	if !allowed {
		next := retryAt.UTC().Format(time.RFC3339)
		if limit == limitGlobal {
			// Operators should hear of this: either a flood of sign-ups
			// or someone making the daemon mail strangers.
			d.log.Warn("global mail limit reached; confirmation mail delayed", "id", doc.ID,
				"global_sends", d.opts.GlobalSends, "global_window", d.opts.GlobalWindow, "next", next)
			c.Set(FieldSendDelayed, "too many confirmation mails recently, to all addresses; next possible at "+next)
		} else {
			c.Set(FieldSendDelayed, "too many mails to this address recently; next possible at "+next)
		}
		return retryAt, nil
	}
	expires := now.Add(d.opts.CodeTTL)
	link := ""
	// An id the confirmation page would refuse gets no link, rather than
	// one that can only fail; the code in the mail still works.
	if d.opts.BaseURL != "" && linkDocID(doc.ID) {
		link = strings.TrimRight(d.opts.BaseURL, "/") + ConfirmPath + "?" +
			url.Values{"d": {doc.ID}, "t": {token}}.Encode()
	}
	body, err := d.opts.Templates.render(TemplateData{
		Owner: req.owner, DeviceName: req.deviceName, Code: code, Link: link,
		Expires: expires.UTC(), ValidFor: d.opts.CodeTTL.Round(time.Second).String(),
	})
	if err != nil {
		return time.Time{}, workflow.Terminal(err)
	}
	msg := Message{
		To: req.owner, From: d.opts.From, Subject: body.subject, Text: body.text, HTML: body.html,
		MessageID: messageID,
		Headers:   map[string]string{"Auto-Submitted": "auto-generated"},
	}
	if err := d.opts.Mailer.Send(ctx, msg); err != nil {
		return time.Time{}, fmt.Errorf("send confirmation mail %s: %w", messageID, err)
	}
	d.log.Info("confirmation mail sent", "id", doc.ID, "message_id", messageID,
		"claim", doc.Claim.Key, "resend_after_takeover", doc.Claim.Takeover)
	c.Set(FieldCodeHash, d.codeHash(doc.ID, code)).
		Set(FieldCodeExpires, stampOf(expires)).
		Set(FieldSends, sends+1).
		Set(FieldLastSentAt, stampOf(now)).
		Set(FieldMessageID, messageID).
		Unset(FieldConfirmAttempt, FieldConfirmLink, FieldResendRequested, FieldResendDenied, FieldSendDelayed)
	if link != "" {
		c.Set(FieldLinkHash, d.linkHash(doc.ID, token))
	} else {
		c.Unset(FieldLinkHash)
	}
	return time.Time{}, nil
}

// codeState is what docstate recorded about the current code.
type codeState struct {
	codeHash, linkHash string
	expires, lastSent  time.Time
	sends, failed      int
}

func readCodeState(doc *workflow.Doc) (codeState, error) {
	var s codeState
	var exp, last workflow.Stamp
	if ok, err := doc.Field(FieldCodeHash, &s.codeHash); err != nil || !ok || s.codeHash == "" {
		return s, workflow.Terminal(errors.New("no confirmation code on record (field code_hash)"))
	}
	if ok, err := doc.Field(FieldCodeExpires, &exp); err != nil || !ok {
		return s, workflow.Terminal(errors.New("no code expiry on record (field code_expires)"))
	}
	s.expires = exp.Time
	_, _ = doc.Field(FieldLinkHash, &s.linkHash)
	if ok, _ := doc.Field(FieldLastSentAt, &last); ok {
		s.lastSent = last.Time
	}
	_, _ = doc.Field(FieldSends, &s.sends)
	_, _ = doc.Field(FieldFailedAttempts, &s.failed)
	return s, nil
}

// handleConfirming checks attempts, expires the code, and resends on
// request. It is Unsafe: the claim serialises runs across engines, so the
// attempt counter it reads is the one the previous run wrote, and no check
// happens without its count being written (a Safe run could check a guess,
// lose the write to a 409 and leave the check uncounted).
func (d *Devices) handleConfirming(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	req, err := d.parseRequest(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	st, err := readCodeState(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	now := time.Now()
	if !now.Before(st.expires) {
		return unset(workflow.Transition(StateExpired).
			Set(FieldReason, "confirmation code expired at "+st.expires.UTC().Format(time.RFC3339)),
			append(codeFields(), inputFields()...)...), nil
	}

	var c changes
	most, err := d.branchFailures(ctx, doc.ID)
	if err != nil {
		return workflow.Result{}, err
	}
	if most > st.failed {
		// A conflicting branch counted more wrong codes than the winner:
		// keep the higher count, since the losing branches are gone now.
		st.failed = most
		c.Set(FieldFailedAttempts, most)
		if st.failed >= d.opts.MaxAttempts {
			d.log.Warn("device locked: a conflicting revision had used up the attempts", "id", doc.ID, "attempts", st.failed)
			return unset(workflow.Transition(StateLocked).
				Set(FieldFailedAttempts, st.failed).
				Set(FieldReason, fmt.Sprintf("locked after %d wrong confirmation attempts", st.failed)),
				append(codeFields(), inputFields()...)...), nil
		}
	}
	// A guess is counted before it is checked, in two runs: the first
	// writes the count and moves the guess to pending_check, the next
	// checks it. One run doing both would count a check only if its result
	// write landed, and a writer who edits the document without pause (an
	// attacker in the shared control database) can make that write lose
	// until the claim's lease runs out, so that the retry checks a new
	// guess with the old count. Checking a pending guess again after such
	// a loss checks the same guess: it tells nobody anything new.
	var pending pendingCheck
	if ok, err := doc.Field(FieldPendingCheck, &pending); ok && err == nil && pending.Attempt > 0 {
		d.verifications.Add(1)
		if d.onCheck != nil {
			d.onCheck(doc.ID, pending)
		}
		why := d.check(doc.ID, pending, st)
		if why == "" {
			res, err := d.activate(ctx, doc, req)
			if err != nil {
				return res, err
			}
			// The attempt was counted as failed; it was not.
			return res.Set(FieldFailedAttempts, max(st.failed-1, 0)), nil
		}
		if st.failed >= d.opts.MaxAttempts {
			d.log.Warn("device locked after too many wrong codes", "id", doc.ID, "attempts", st.failed)
			return unset(workflow.Transition(StateLocked).
				Set(FieldFailedAttempts, st.failed).
				Set(FieldLastAttemptError, why).
				Set(FieldReason, fmt.Sprintf("locked after %d wrong confirmation attempts", st.failed)),
				append(codeFields(), inputFields()...)...), nil
		}
		c.Set(FieldLastAttemptError, fmt.Sprintf("%s (attempt %d of %d)", why, pending.Attempt, d.opts.MaxAttempts)).
			Unset(FieldPendingCheck)
	} else if doc.Has(FieldConfirmAttempt) || doc.Has(FieldConfirmLink) {
		st.failed++
		c.Set(FieldFailedAttempts, st.failed).
			Set(FieldPendingCheck, pendingOf(doc, st.failed)).
			Unset(FieldConfirmAttempt, FieldConfirmLink)
		// The check runs next, at once; a restart in between finds the
		// pending guess by the start scan.
		return c.apply(workflow.Stay()).RecheckAfter(time.Millisecond), nil
	}

	wake := st.expires
	var resend bool
	if ok, err := doc.Field(FieldResendRequested, &resend); ok || err != nil {
		c.Unset(FieldResendRequested)
		if next := st.lastSent.Add(d.opts.ResendInterval); resend && err == nil && now.Before(next) {
			c.Set(FieldResendDenied, "resend too soon: the last mail went out at "+
				st.lastSent.UTC().Format(time.RFC3339)+"; next possible at "+next.UTC().Format(time.RFC3339))
		} else if resend && err == nil {
			retryAt, err := d.send(ctx, doc, req, st.sends, &c)
			if err != nil {
				return workflow.Result{}, err
			}
			if !retryAt.IsZero() {
				// Refused rather than delayed: the device may ask again.
				// send said why in send_delayed; a refused resend says it
				// in resend_denied instead.
				why, _ := c.set[FieldSendDelayed].(string)
				delete(c.set, FieldSendDelayed)
				c.Set(FieldResendDenied, "resend refused: "+why)
			} else {
				wake = time.Now().Add(d.opts.CodeTTL)
			}
		}
	}
	return c.apply(workflow.Stay()).WakeAt(wake), nil
}

// branchFailures returns the highest failed_attempts among the document's
// conflicting revisions and deletes them. A revision replicated in on a
// side branch is validated against its stored parent, not the current
// winner, so a branch forked from an older confirming revision can carry a
// lower count and win (CouchDB 3). Taking the highest count over all
// branches keeps the attempt limit; deleting the losers keeps it from
// being replayed.
func (d *Devices) branchFailures(ctx context.Context, id string) (int, error) {
	var cur struct {
		Conflicts []string `json:"_conflicts"`
	}
	if err := d.opts.DB.Get(ctx, id, kivik.Param("conflicts", true)).ScanDoc(&cur); err != nil {
		return 0, fmt.Errorf("read conflicting revisions: %w", err)
	}
	most := 0
	for _, rev := range cur.Conflicts {
		var branch struct {
			Failed *float64 `json:"failed_attempts"`
		}
		err := d.opts.DB.Get(ctx, id, kivik.Rev(rev)).ScanDoc(&branch)
		if err != nil && !couch.IsNotFound(err) {
			return 0, fmt.Errorf("read conflicting revision %s: %w", rev, err)
		}
		if branch.Failed != nil && int(*branch.Failed) > most {
			most = int(*branch.Failed)
		}
		if _, err := d.opts.DB.Delete(ctx, id, rev); err != nil && !couch.IsNotFound(err) && !couch.IsConflict(err) {
			return 0, fmt.Errorf("delete conflicting revision %s: %w", rev, err)
		}
		d.log.Warn("deleted a conflicting revision of a device in confirmation", "id", id, "rev", rev)
	}
	return most, nil
}

// check returns "" when the attempt proves the code, else why not. Both
// comparisons are of HMACs, in constant time.
func (d *Devices) check(id string, p pendingCheck, st codeState) string {
	if p.Link != nil {
		if st.linkHash != "" && equalHex(*p.Link, d.linkProof(id, st.linkHash)) {
			return ""
		}
		return "confirmation link not valid for the current code"
	}
	if p.Code == nil {
		return "confirm_attempt must be a string"
	}
	attempt := *p.Code
	if len(attempt) > maxAttemptLen {
		return "wrong code"
	}
	attempt = strings.NewReplacer(" ", "", "-", "").Replace(attempt)
	if equalHex(d.codeHash(id, attempt), st.codeHash) {
		return ""
	}
	return "wrong code"
}

// pendingCheck is a guess counted and waiting for its check: the code a
// device wrote (nil when it was not a string) or the link's proof, and the
// attempt number it was counted as.
type pendingCheck struct {
	Attempt int     `json:"attempt"`
	Code    *string `json:"code,omitempty"`
	Link    *string `json:"link,omitempty"`
}

// pendingOf moves the document's guess into a pendingCheck counted as
// attempt n. A link's proof wins over a typed code, as it did when both
// were checked in one run.
func pendingOf(doc *workflow.Doc, n int) pendingCheck {
	p := pendingCheck{Attempt: n}
	var s string
	if ok, err := doc.Field(FieldConfirmLink, &s); ok || err != nil {
		if err != nil {
			s = "" // not a string: matches no proof
		}
		p.Link = &s
		return p
	}
	if _, err := doc.Field(FieldConfirmAttempt, &s); err == nil {
		p.Code = &s
	}
	return p
}

// activate provisions the CouchDB user and moves the device to active.
func (d *Devices) activate(ctx context.Context, doc *workflow.Doc, req request) (workflow.Result, error) {
	if d.usersMode(doc) {
		return d.activateUser(ctx, doc, req)
	}
	name := UserName(doc.ID, req.creds.Salt)
	role := OwnerRole(req.owner)
	if err := d.provision(ctx, doc.ID, name, role, req.creds); err != nil {
		return workflow.Result{}, fmt.Errorf("provision CouchDB user: %w", err)
	}
	d.log.Info("device confirmed", "id", doc.ID, "user", name)
	return unset(workflow.Transition(StateActive).
		Set(FieldCouchUser, name).
		Set(FieldOwnerRole, role).
		Set(FieldActivatedAt, stampOf(time.Now())),
		append(append(codeFields(), inputFields()...), FieldLastAttemptError, FieldResendDenied, FieldSendDelayed)...), nil
}

// activateUser activates a device of the users mode: its owner's control
// database is made (or healed) first, then its own user gets the owner's
// role, and its entry is listed for the owner's other devices. Each step
// is idempotent, so a takeover after a crash repeats them harmlessly.
func (d *Devices) activateUser(ctx context.Context, doc *workflow.Doc, req request) (workflow.Result, error) {
	var user string
	_, _ = doc.Field(FieldCouchUser, &user)
	role := OwnerRole(req.owner)
	if _, err := d.ProvisionUserDB(ctx, req.owner); err != nil {
		return workflow.Result{}, fmt.Errorf("provision the owner's control database: %w", err)
	}
	// The role is granted by the active handler once this transition is
	// written: granted now, the _users follower would see a role that the
	// trusted document does not show yet, and take it off.
	now := stampOf(time.Now())
	db := UserDBName(req.owner)
	d.log.Info("device confirmed", "id", doc.ID, "user", user, "control_db", db)
	res := workflow.Transition(StateActive).
		Set(FieldOwnerRole, role).
		Set(FieldActivatedAt, now).
		Set(FieldControlDB, db)
	if d.opts.PublicURL != "" {
		res = res.Set(FieldControlURL, strings.TrimRight(d.opts.PublicURL, "/")+"/"+db)
	}
	return unset(res, append(append(codeFields(), inputFields()...), FieldLastAttemptError, FieldResendDenied, FieldSendDelayed)...), nil
}

// handleActive revokes on request. Safe: deleting a user is idempotent.
func (d *Devices) handleActive(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	var revoke bool
	if ok, _ := doc.Field(FieldRevokeRequested, &revoke); !ok || !revoke {
		if d.usersMode(doc) {
			return workflow.Stay(), d.settleActiveUser(ctx, doc)
		}
		return workflow.Stay(), nil
	}
	var name string
	if ok, err := doc.Field(FieldCouchUser, &name); err != nil || !ok || name == "" {
		return workflow.Result{}, workflow.Terminal(errors.New("active device without couch_user"))
	}
	if err := d.deprovision(ctx, doc.ID, name); err != nil {
		return workflow.Result{}, fmt.Errorf("revoke CouchDB user: %w", err)
	}
	if d.usersMode(doc) {
		var owner, deviceName string
		_, _ = doc.Field(FieldOwner, &owner)
		_, _ = doc.Field(FieldDeviceName, &deviceName)
		if err := d.putDeviceInfo(ctx, owner, map[string]any{
			"_id": TrustedID(name), "type": DeviceInfoType, "state": StateRevoked,
			FieldCouchUser: name, FieldDeviceName: deviceName, FieldRevokedAt: stampOf(time.Now()),
		}); err != nil {
			return workflow.Result{}, fmt.Errorf("list the device as revoked for its owner: %w", err)
		}
	}
	d.log.Info("device revoked", "id", doc.ID, "user", name)
	return workflow.Transition(StateRevoked).
		Set(FieldRevokedAt, stampOf(time.Now())).
		Set(FieldReason, "revoked on request").
		Unset(FieldRevokeRequested), nil
}

// settleActiveUser makes an active device of the users mode whole: its
// user has the owner's role, its entry is in the owner's control database,
// and its status names that database. Every step writes only what differs,
// so a repeat (a restart's scan, a heal) changes nothing.
func (d *Devices) settleActiveUser(ctx context.Context, doc *workflow.Doc) error {
	var user, owner, deviceName, controlDB, controlURL string
	var activated any
	_, _ = doc.Field(FieldCouchUser, &user)
	_, _ = doc.Field(FieldOwner, &owner)
	_, _ = doc.Field(FieldDeviceName, &deviceName)
	_, _ = doc.Field(FieldActivatedAt, &activated)
	_, _ = doc.Field(FieldControlDB, &controlDB)
	_, _ = doc.Field(FieldControlURL, &controlURL)
	if err := d.grantRole(ctx, doc.ID, user, OwnerRole(owner)); err != nil {
		return fmt.Errorf("grant the owner's role: %w", err)
	}
	if err := d.putDeviceInfo(ctx, owner, map[string]any{
		"_id": TrustedID(user), "type": DeviceInfoType, "state": StateActive,
		FieldCouchUser: user, FieldDeviceName: deviceName, FieldActivatedAt: activated,
	}); err != nil {
		return fmt.Errorf("list the device for its owner: %w", err)
	}
	st := map[string]any{"state": StateActive, FieldControlDB: controlDB}
	if controlURL != "" {
		st[FieldControlURL] = controlURL
	}
	return d.publish(ctx, doc, st)
}
