package channels

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/identity"
	"github.com/docstate/docstate/workflow"
)

// Channels asked for by replication (devices users mode; see doc.go
// "Channels in the owners' control databases").
//
// A device never writes what the daemon decides. It writes a new
// channel_request document into its owner's control database, offline if
// need be; the daemon applies it to the channel document (id "channel:" +
// slug, in the same database), which only the daemon writes, and reports
// the outcome on the request. Requests are new documents, never updates,
// for two reasons: an offline device's edit of a document the daemon also
// writes would become a stored conflict whose losing side is lost, and
// PouchDB Server acknowledges, then drops, a replicated update of an
// existing document (a new document comes through).
const (
	// RequestType is the type of the documents devices write.
	RequestType = "channel_request"
	// RequestIDPrefix starts every request's id, so that no request can
	// take an id the daemon writes (the validation function enforces it).
	RequestIDPrefix = "channel_request:"
	// ChannelIDPrefix starts a channel document's id in a per-owner
	// control database; the slug after it is the channel's id there.
	ChannelIDPrefix = "channel:"
	// UserSubscriptionPrefix starts the id of a subscription the daemon
	// writes into a member's control database, one per channel and member
	// (not per device: every device of the member replicates the same).
	UserSubscriptionPrefix = "channel-subscription:"

	// Request states.
	StateRequested = "new"
	StateApplied   = "applied"
	StateRefused   = "refused"

	// Request actions.
	ActionCreate        = "create"
	ActionRename        = "rename"
	ActionAddMembers    = "add_members"
	ActionRemoveMembers = "remove_members"
	ActionDelete        = "delete"

	FieldAction  = "action"
	FieldChannel = "channel"
	// FieldChannelDoc is where an applied request names the channel
	// document it changed.
	FieldChannelDoc = "channel_doc"
	FieldReason     = "reason"
	FieldOwnerRole  = "owner_role"
	FieldCreatedBy  = "created_by"
	FieldApplied    = "applied"
	FieldAppliedAt  = "applied_at"
	FieldSynced     = "synced_name"

	// invitesPrefix starts the id of a role's invitation list in the
	// shared control database (only server admins read it in users mode):
	// the channels of any owner that admit the role. It is what a member's
	// control database is made to match, when the member is invited and
	// when a device of theirs is activated later.
	invitesPrefix = "channel-invites:"
	invitesType   = "channel-invites"

	// maxSlug bounds a channel's slug; keepApplied how many request ids a
	// channel document remembers, so that a request run twice (a crash
	// before its outcome was written) is applied once.
	maxSlug     = 64
	keepApplied = 100
	writeTries  = 8
)

// RegisterUserDBs registers the handlers of the per-owner control
// databases: requests, channel documents, and the activation of a device
// (its device_info entry), which brings the channels its owner is invited
// to. For the supervisor over identity.UserDBPrefix + "*" that
// devices.Followers runs (devices.FollowerOptions.Handlers).
func (c *Channels) RegisterUserDBs(reg *workflow.Registry) error {
	for _, s := range []workflow.Spec{
		{Type: RequestType, State: StateRequested, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleRequest)},
		{Type: DocType, State: StateNew, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleUserChannel)},
		{Type: DocType, State: StateReady, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleUserChannel)},
		{Type: DocType, State: StateDeleting, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleUserDeleting)},
		{Type: identity.DeviceInfoType, State: identity.StateActive, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleDeviceActive)},
	} {
		if err := reg.Register(s); err != nil {
			return fmt.Errorf("channels: %w", err)
		}
	}
	return nil
}

// roleOfUserDB is the owner role whose control database is name.
func roleOfUserDB(name string) (string, bool) { return identity.RoleOfUserDB(name) }

// CheckSlug reports whether s can name a channel in an owner's control
// database: 1 to 64 of a-z 0-9 _ -, starting with a letter or digit.
func CheckSlug(s string) error {
	if s == "" || len(s) > maxSlug {
		return fmt.Errorf("channel must be 1 to %d characters", maxSlug)
	}
	for i := range len(s) {
		b := s[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || i > 0 && (b == '_' || b == '-')) {
			return fmt.Errorf("channel %q may hold only a-z, 0-9, _ and -, starting with a letter or digit", s)
		}
	}
	return nil
}

// UserChannelDB is the database of owner role's channel slug. It is derived
// from both, so no request can name another owner's database.
func (c *Channels) UserChannelDB(role, slug string) string {
	return DBName(c.opts.Prefix, "role:"+role, slug)
}

// request is a device's channel request, validated.
type request struct {
	slug, action, name, template string
	members                      []string
}

// parseRequest validates a request; the error is the reason a refusal
// records. The validation function refuses the same before the write on
// CouchDB; this holds wherever it did not run.
func (c *Channels) parseRequest(doc *workflow.Doc) (request, error) {
	var r request
	if !strings.HasPrefix(doc.ID, RequestIDPrefix) {
		return r, fmt.Errorf("a request's id must start with %q", RequestIDPrefix)
	}
	if doc.Has(FieldOwner) || doc.Has(FieldDatabase) {
		return r, errors.New("a request names no owner and no database: both follow from the database it is written in")
	}
	if ok, err := doc.Field(FieldChannel, &r.slug); err != nil || !ok {
		return r, errors.New("channel must be a string")
	}
	if err := CheckSlug(r.slug); err != nil {
		return r, err
	}
	if ok, err := doc.Field(FieldAction, &r.action); err != nil || !ok {
		return r, errors.New("action must be a string")
	}
	needName, needMembers := false, false
	switch r.action {
	case ActionCreate:
		needName = true
	case ActionRename:
		needName = true
	case ActionAddMembers, ActionRemoveMembers:
		needMembers = true
	case ActionDelete:
	default:
		return r, fmt.Errorf("action %q is not one of create, rename, add_members, remove_members, delete", r.action)
	}
	if needName || doc.Has(FieldName) {
		if ok, err := doc.Field(FieldName, &r.name); err != nil || !ok {
			return r, errors.New("name must be a string")
		}
		if err := CheckName(r.name); err != nil {
			return r, err
		}
	}
	if raw, ok := rawField(doc, FieldMembers); ok {
		var members []json.RawMessage
		if err := json.Unmarshal(raw, &members); err != nil {
			return r, errors.New("members must be an array of email addresses")
		}
		if len(members) > c.opts.MaxMembers {
			return r, fmt.Errorf("members lists %d addresses, more than %d", len(members), c.opts.MaxMembers)
		}
		for i, m := range members {
			var s string
			if len(m) == 0 || m[0] != '"' || json.Unmarshal(m, &s) != nil {
				return r, fmt.Errorf("members[%d] must be a string", i)
			}
			if err := identity.CheckEmail(s); err != nil {
				return r, fmt.Errorf("members[%d] %w", i, err)
			}
			r.members = append(r.members, strings.ToLower(s))
		}
	}
	if doc.Has(FieldTemplate) {
		if ok, err := doc.Field(FieldTemplate, &r.template); err != nil || !ok || r.action != ActionCreate {
			return r, errors.New("template must be a string, on a create request")
		}
		if _, ok := c.opts.Templates[r.template]; !ok {
			return r, fmt.Errorf("no template %q is configured", r.template)
		}
	}
	if needMembers && len(r.members) == 0 {
		return r, fmt.Errorf("%s needs members", r.action)
	}
	slices.Sort(r.members)
	r.members = slices.Compact(r.members)
	return r, nil
}

// handleRequest applies a device's request to its channel document and
// records the outcome on the request: applied (with the channel's id), or
// refused with a reason. Applying is a compare-and-swap on the channel
// document, which remembers the requests applied to it, so a request run
// twice changes it once.
func (c *Channels) handleRequest(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	refuse := func(why string) (workflow.Result, error) {
		return workflow.Transition(StateRefused).Set(FieldReason, why), nil
	}
	role, ok := roleOfUserDB(doc.DB().Name())
	if !ok {
		return refuse("not in a per-owner control database")
	}
	req, err := c.parseRequest(doc)
	if err != nil {
		return refuse(err.Error())
	}
	db := doc.DB()
	id := ChannelIDPrefix + req.slug
	for range writeTries {
		cur, err := readMap(ctx, db, id)
		if err != nil {
			return workflow.Result{}, err
		}
		next, why := c.apply(cur, req, role, doc.ID)
		if why != "" {
			return refuse(why)
		}
		if next != nil {
			next["_id"], _ = json.Marshal(id)
			if _, err := db.Put(ctx, id, next); couch.IsConflict(err) {
				continue
			} else if err != nil {
				return workflow.Result{}, fmt.Errorf("write %s: %w", id, err)
			}
			c.log.Info("channel request applied", "database", db.Name(), "request", doc.ID, "channel", id, "action", req.action)
		}
		return workflow.Transition(StateApplied).
			Set(FieldChannelDoc, id).
			Set(FieldAppliedAt, time.Now().UTC().Format(time.RFC3339)), nil
	}
	return workflow.Result{}, fmt.Errorf("write %s: kept conflicting", id)
}

// apply returns the channel document with req applied to cur (nil: there
// is nothing to write, it was applied already), or why it is refused.
func (c *Channels) apply(cur map[string]json.RawMessage, req request, role, requestID string) (map[string]json.RawMessage, string) {
	var applied []string
	state := ""
	if cur != nil {
		_ = json.Unmarshal(cur[FieldApplied], &applied)
		_ = json.Unmarshal(cur["state"], &state)
		if slices.Contains(applied, requestID) {
			return nil, ""
		}
	}
	deleteRequested := false
	if cur != nil {
		_ = json.Unmarshal(cur[FieldDeleteRequested], &deleteRequested)
	}
	gone := cur == nil || state == StateDeleted
	var members []string
	if cur != nil && !gone {
		_ = json.Unmarshal(cur[FieldMembers], &members)
	}
	next := map[string]json.RawMessage{}
	for k, v := range cur {
		next[k] = v
	}
	set := func(k string, v any) {
		b, _ := json.Marshal(v)
		next[k] = b
	}
	switch {
	case req.action == ActionCreate && !gone:
		return nil, "channel " + req.slug + " exists; rename it or change its members instead"
	case req.action == ActionCreate:
		// A deleted channel can be created again: same database name,
		// created afresh, without the old one's records.
		for _, k := range []string{FieldDeleteRequested, FieldDeletedAt, FieldMemberRoles, FieldSubscriptions, FieldSynced, FieldTemplate, FieldSeed} {
			delete(next, k)
		}
		set("type", DocType)
		set("state", StateNew)
		set(FieldOwnerRole, role)
		set(FieldName, req.name)
		set(FieldMembers, req.members)
		set(FieldCreatedBy, requestID)
		if req.template != "" {
			set(FieldTemplate, req.template)
		}
	case gone && req.action == ActionDelete:
		if cur == nil {
			return nil, "no channel " + req.slug + " to delete"
		}
		return nil, "" // deleted already
	case gone:
		return nil, "no channel " + req.slug
	case req.action == ActionDelete:
		if deleteRequested || state == StateDeleting {
			return nil, ""
		}
		set(FieldDeleteRequested, true)
	case deleteRequested || state == StateDeleting:
		return nil, "channel " + req.slug + " is being deleted"
	case req.action == ActionRename:
		set(FieldName, req.name)
		if len(req.members) > 0 {
			return nil, "rename takes a name, not members"
		}
	case req.action == ActionAddMembers:
		members = append(members, req.members...)
		slices.Sort(members)
		members = slices.Compact(members)
		if len(members) > c.opts.MaxMembers {
			return nil, fmt.Sprintf("the channel would have %d members, more than %d", len(members), c.opts.MaxMembers)
		}
		set(FieldMembers, members)
	case req.action == ActionRemoveMembers:
		members = slices.DeleteFunc(members, func(m string) bool { return slices.Contains(req.members, m) })
		set(FieldMembers, members)
	}
	applied = append(applied, requestID)
	if len(applied) > keepApplied {
		applied = applied[len(applied)-keepApplied:]
	}
	set(FieldApplied, applied)
	return next, ""
}

// userChannel is a channel document of a per-owner control database.
type userChannel struct {
	role, slug, name string
	template         string
	seed             seed
	members          []string
	deleteRequested  bool
	// synced is the name the invitations were last written with.
	synced string
}

// roles admitted: the owner's and every member's.
func (u userChannel) roles() []string {
	out := []string{u.role}
	for _, m := range u.members {
		out = append(out, identity.OwnerRole(m))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (c *Channels) parseUserChannel(doc *workflow.Doc) (userChannel, error) {
	var u userChannel
	role, ok := roleOfUserDB(doc.DB().Name())
	if !ok {
		return u, workflow.Terminal(errors.New("not in a per-owner control database"))
	}
	u.role = role
	var recorded string
	if _, err := doc.Field(FieldOwnerRole, &recorded); err != nil || recorded != role {
		return u, workflow.Terminal(errors.New("owner_role is not this database's owner"))
	}
	slug, ok := strings.CutPrefix(doc.ID, ChannelIDPrefix)
	if !ok || CheckSlug(slug) != nil {
		return u, workflow.Terminal(fmt.Errorf("a channel document's id is %q and a slug", ChannelIDPrefix))
	}
	u.slug = slug
	if _, err := doc.Field(FieldName, &u.name); err != nil || CheckName(u.name) != nil {
		return u, workflow.Terminal(errors.New("name is not a channel name"))
	}
	if _, err := doc.Field(FieldMembers, &u.members); err != nil {
		return u, workflow.Terminal(errors.New("members must be an array of addresses"))
	}
	_, _ = doc.Field(FieldDeleteRequested, &u.deleteRequested)
	_, _ = doc.Field(FieldSynced, &u.synced)
	_, _ = doc.Field(FieldTemplate, &u.template)
	_, _ = doc.Field(FieldSeed, &u.seed)
	return u, nil
}

// invite is what a member's subscription is made from.
type invite struct {
	Channel   string `json:"channel"` // <owner's control database>/<channel document id>
	Name      string `json:"name"`
	OwnerRole string `json:"owner_role"`
	Database  string `json:"database"`
	URL       string `json:"url,omitempty"`
}

// handleUserChannel provisions a channel of an owner's control database
// and keeps it in line: the database exists, is claimed by its description
// document, and admits exactly the owner's and the members' roles
// (verified by reading it back); every role admitted is invited (its
// invitation list holds the channel) and every role no longer admitted is
// not; the control databases of those roles hold the matching
// subscriptions. The invitations are rewritten only when the roles or the
// name changed since they were last written, and the channel document
// only then: an idle channel makes no revision. It rechecks _security every
// ReconcileInterval, in memory.
func (c *Channels) handleUserChannel(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	u, err := c.parseUserChannel(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	if u.deleteRequested {
		return workflow.Transition(StateDeleting), nil
	}
	name := c.UserChannelDB(u.role, u.slug)
	if err := c.opts.Client.CreateDB(ctx, name); err != nil && !couch.IsPreconditionFailed(err) {
		return workflow.Result{}, fmt.Errorf("create database %s: %w", name, err)
	}
	db := c.opts.Client.DB(name)
	ref := doc.DB().Name() + "/" + doc.ID
	if err := c.claimInfo(ctx, db, ref, u.name, u.role); err != nil {
		return workflow.Result{}, err
	}
	roles := u.roles()
	if err := ensureSecurity(ctx, db, roles); err != nil {
		return workflow.Result{}, err
	}
	var state string
	_, _ = doc.Field("state", &state)
	sd, recheck, err := c.seedOf(ctx, u, name)
	if err != nil {
		return workflow.Result{}, err
	}
	prev := previousRoles(doc)
	if state == StateReady && slices.Equal(prev, roles) && u.synced == u.name {
		if sd == u.seed {
			return workflow.Stay().RecheckAfter(recheck), nil
		}
		c.seedChanged(ref, sd)
		return workflow.Stay().Set(FieldSeed, sd).RecheckAfter(recheck), nil
	}
	inv := invite{Channel: ref, Name: u.name, OwnerRole: u.role, Database: name}
	if c.opts.PublicURL != "" {
		inv.URL = c.opts.PublicURL + "/" + name
	}
	if err := c.invite(ctx, inv, roles, prev); err != nil {
		return workflow.Result{}, err
	}
	// Invitations written by a run that read the channel before its
	// deletion began must not outlive it: read it again, and take them
	// back if it is no longer live (the deletion takes its own back; this
	// covers a run that raced it, on another daemon).
	if live, err := c.stillLive(ctx, doc.DB(), doc.ID); err != nil {
		return workflow.Result{}, err
	} else if !live {
		if err := c.invite(ctx, inv, nil, roles); err != nil {
			return workflow.Result{}, err
		}
		return workflow.Stay(), nil
	}
	if state == StateNew && c.opts.OnProvisioned != nil {
		c.opts.OnProvisioned()
	}
	c.log.Info("channel provisioned", "id", ref, "database", name, "members", len(roles))
	res := workflow.Stay()
	if state == StateNew {
		res = workflow.Transition(StateReady).Set(FieldProvisionedAt, time.Now().UTC().Format(time.RFC3339))
	}
	res = res.Set(FieldDatabase, name).Set(FieldMemberRoles, roles).Set(FieldSynced, u.name)
	if inv.URL != "" {
		res = res.Set(FieldURL, inv.URL)
	}
	if sd != u.seed {
		c.seedChanged(ref, sd)
		res = res.Set(FieldSeed, sd)
	}
	if state != StateNew {
		res = res.RecheckAfter(recheck)
	}
	return res, nil
}

// seedOf is the channel's seed state now, asking the server while the
// seed is under way, and how soon to look again: soon while it is, every
// ReconcileInterval once it is done or when there is none.
func (c *Channels) seedOf(ctx context.Context, u userChannel, database string) (seed, time.Duration, error) {
	switch {
	case u.template == "":
		return u.seed, c.opts.ReconcileInterval, nil
	case u.seed.State == SeedCompleted || u.seed.State == SeedFailed:
		return u.seed, c.opts.ReconcileInterval, nil
	}
	source, ok := c.opts.Templates[u.template]
	if !ok {
		return seed{State: SeedFailed, Reason: fmt.Sprintf("template %q is no longer configured", u.template)}, c.opts.ReconcileInterval, nil
	}
	sd, err := c.ensureSeed(ctx, database, source)
	if err != nil {
		return seed{}, 0, err
	}
	if sd.State == SeedCompleted || sd.State == SeedFailed {
		return sd, c.opts.ReconcileInterval, nil
	}
	return sd, min(seedRecheck, c.opts.ReconcileInterval), nil
}

// seedChanged logs and counts a seed's new state.
func (c *Channels) seedChanged(ref string, sd seed) {
	level := slog.LevelInfo
	if sd.State == SeedCrashing || sd.State == SeedFailed {
		level = slog.LevelWarn
	}
	c.log.Log(context.Background(), level, "channel seed", "id", ref, "state", sd.State, "reason", sd.Reason)
	if c.opts.OnSeed != nil {
		c.opts.OnSeed(sd.State)
	}
}

// stillLive reports whether the channel document is still new or ready
// without a delete request.
func (c *Channels) stillLive(ctx context.Context, db *kivik.DB, id string) (bool, error) {
	var cur struct {
		State  string `json:"state"`
		Delete bool   `json:"delete_requested"`
	}
	err := db.Get(ctx, id).ScanDoc(&cur)
	switch {
	case couch.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("re-read %s: %w", id, err)
	}
	return (cur.State == StateNew || cur.State == StateReady) && !cur.Delete, nil
}

// handleUserDeleting takes every invitation back (the members'
// subscriptions go with them), then deletes or archives the database.
func (c *Channels) handleUserDeleting(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	u, err := c.parseUserChannel(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	name := c.UserChannelDB(u.role, u.slug)
	ref := doc.DB().Name() + "/" + doc.ID
	lookIn := append(previousRoles(doc), u.roles()...)
	if err := c.invite(ctx, invite{Channel: ref, Database: name}, nil, lookIn); err != nil {
		return workflow.Result{}, err
	}
	if err := c.dropSeed(ctx, name); err != nil {
		return workflow.Result{}, err
	}
	switch c.opts.OnDelete {
	case ArchiveDatabase:
		if err := ensureSecurity(ctx, c.opts.Client.DB(name), nil); err != nil && !couch.IsNotFound(err) {
			return workflow.Result{}, err
		}
	default:
		if err := c.opts.Client.DestroyDB(ctx, name); err != nil && !couch.IsNotFound(err) {
			return workflow.Result{}, fmt.Errorf("delete database %s: %w", name, err)
		}
	}
	c.log.Info("channel deleted", "id", ref, "database", name, "policy", c.opts.OnDelete)
	return workflow.Transition(StateDeleted).
		Set(FieldDeletedAt, time.Now().UTC().Format(time.RFC3339)).
		Set(FieldDatabase, name).
		Set(FieldMemberRoles, []string{}), nil
}

// handleDeviceActive runs when a device's entry in its owner's control
// database says it is active (written at activation): the owner's control
// database is made to hold a subscription for every channel the owner is
// invited to, so a device activated after the invitation finds its
// channels at once, not after an interval. Nothing is written when they
// are in place.
func (c *Channels) handleDeviceActive(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	role, ok := roleOfUserDB(doc.DB().Name())
	if !ok {
		return workflow.Stay(), nil
	}
	unlock := c.lockRole(role)
	defer unlock()
	if err := c.syncMember(ctx, role); err != nil {
		return workflow.Result{}, err
	}
	return workflow.Stay(), nil
}

// invite puts inv on the invitation list of every role in add and takes it
// off every role in remove that is not in add, and brings each of those
// roles' control databases in line. Each role is done under its stripe of
// roleLocks: the channels of one daemon that share a member then take
// turns on that member's list and database instead of racing (and
// redoing) on both; daemons still race, which the compare-and-swap and
// syncMember's re-read settle.
func (c *Channels) invite(ctx context.Context, inv invite, add, remove []string) error {
	for _, r := range add {
		if err := c.inviteOne(ctx, r, func(m map[string]invite) { m[inv.Database] = inv }); err != nil {
			return err
		}
	}
	for _, r := range remove {
		if slices.Contains(add, r) {
			continue
		}
		if err := c.inviteOne(ctx, r, func(m map[string]invite) { delete(m, inv.Database) }); err != nil {
			return err
		}
	}
	return nil
}

func (c *Channels) inviteOne(ctx context.Context, role string, change func(map[string]invite)) error {
	unlock := c.lockRole(role)
	defer unlock()
	// The database is synced whether or not the list changed: a run
	// repeated after a crash between the list's write and the sync finds
	// the list already right.
	if _, err := c.updateInvites(ctx, role, change); err != nil {
		return err
	}
	return c.syncMember(ctx, role)
}

// lockRole takes role's stripe of the daemon's role locks.
func (c *Channels) lockRole(role string) (unlock func()) {
	h := fnv.New32a()
	_, _ = h.Write([]byte(role))
	mu := &c.roleLocks[h.Sum32()%uint32(len(c.roleLocks))]
	mu.Lock()
	return mu.Unlock
}

type invitesDoc struct {
	ID       string            `json:"_id"`
	Rev      string            `json:"_rev,omitempty"`
	Type     string            `json:"type"`
	Role     string            `json:"role"`
	Channels map[string]invite `json:"channels"`
}

// readInvites returns role's invitation list (empty when there is none).
func (c *Channels) readInvites(ctx context.Context, role string) (invitesDoc, error) {
	d := invitesDoc{ID: invitesPrefix + role, Type: invitesType, Role: role}
	err := c.opts.DB.Get(ctx, d.ID).ScanDoc(&d)
	if err != nil && !couch.IsNotFound(err) {
		return d, fmt.Errorf("read %s: %w", d.ID, err)
	}
	if d.Channels == nil {
		d.Channels = map[string]invite{}
	}
	return d, nil
}

// updateInvites changes role's invitation list with change, and writes it
// when it changed (compare-and-swap, redone on conflict).
func (c *Channels) updateInvites(ctx context.Context, role string, change func(map[string]invite)) (bool, error) {
	for range writeTries {
		d, err := c.readInvites(ctx, role)
		if err != nil {
			return false, err
		}
		before := maps.Clone(d.Channels)
		change(d.Channels)
		if maps.Equal(before, d.Channels) {
			return false, nil
		}
		if d.Rev == "" && len(d.Channels) == 0 {
			return false, nil
		}
		if _, err := c.opts.DB.Put(ctx, d.ID, d); couch.IsConflict(err) {
			continue
		} else if err != nil {
			return false, fmt.Errorf("write %s: %w", d.ID, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("write %s%s: kept conflicting", invitesPrefix, role)
}

// memberSubscription is what a member's devices read, in their own
// control database, to replicate a channel.
type memberSubscription struct {
	ID        string `json:"_id"`
	Rev       string `json:"_rev,omitempty"`
	Type      string `json:"type"`
	Channel   string `json:"channel"`
	Name      string `json:"name"`
	OwnerRole string `json:"owner_role"`
	Database  string `json:"database"`
	URL       string `json:"url,omitempty"`
	Direction string `json:"direction"`
}

// syncMember makes role's control database hold exactly one subscription
// per channel on role's invitation list. A role without a control database
// (no device of theirs activated yet) is skipped: its first activation
// syncs it. After writing, the list is read again and the sync repeated if
// it changed meanwhile, so that of two syncs racing on one database
// (an invitation and another's removal, on two daemons) the last one
// writes from the newest list.
func (c *Channels) syncMember(ctx context.Context, role string) error {
	udb := userDBOfRole(role)
	if udb == "" {
		return nil
	}
	db := c.opts.Client.DB(udb)
	for range writeTries {
		inv, err := c.readInvites(ctx, role)
		if err != nil {
			return err
		}
		have := map[string]memberSubscription{}
		rows := db.AllDocs(ctx, kivik.Params(map[string]any{
			"startkey": UserSubscriptionPrefix, "endkey": UserSubscriptionPrefix + "\ufff0", "include_docs": true,
		}))
		for rows.Next() {
			var s memberSubscription
			if rows.ScanDoc(&s) == nil && s.Type == SubscriptionType {
				have[s.ID] = s
			}
		}
		if err := rows.Err(); couch.IsNotFound(err) {
			return nil
		} else if err != nil {
			return fmt.Errorf("list subscriptions in %s: %w", udb, err)
		}
		var writes []any
		for _, in := range inv.Channels {
			s := memberSubscription{
				ID: UserSubscriptionPrefix + in.Database, Type: SubscriptionType, Channel: in.Channel,
				Name: in.Name, OwnerRole: in.OwnerRole, Database: in.Database, URL: in.URL, Direction: "both",
			}
			if cur, ok := have[s.ID]; ok {
				s.Rev = cur.Rev
				if cur == s {
					continue
				}
			}
			writes = append(writes, s)
		}
		for id, cur := range have {
			if _, ok := inv.Channels[strings.TrimPrefix(id, UserSubscriptionPrefix)]; !ok {
				writes = append(writes, map[string]any{"_id": id, "_rev": cur.Rev, "_deleted": true})
			}
		}
		if len(writes) > 0 {
			results, err := db.BulkDocs(ctx, writes)
			if err != nil {
				return fmt.Errorf("write subscriptions in %s: %w", udb, err)
			}
			conflicted := false
			for _, r := range results {
				if r.Error != nil && couch.IsConflict(r.Error) {
					conflicted = true
				} else if r.Error != nil {
					return fmt.Errorf("write subscription %s in %s: %w", r.ID, udb, r.Error)
				} else if database, ok := strings.CutPrefix(r.ID, UserSubscriptionPrefix); ok && c.opts.OnSubscribed != nil {
					if _, invited := inv.Channels[database]; invited {
						c.opts.OnSubscribed(role, database)
					}
				}
			}
			if conflicted {
				continue
			}
		}
		again, err := c.readInvites(ctx, role)
		if err != nil {
			return err
		}
		if again.Rev == inv.Rev {
			return nil
		}
	}
	return fmt.Errorf("subscriptions in %s: kept changing", udb)
}

// readMap reads a document as raw fields, nil when it does not exist.
func readMap(ctx context.Context, db *kivik.DB, id string) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	err := db.Get(ctx, id).ScanDoc(&m)
	if couch.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", id, err)
	}
	return m, nil
}
