package channels

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/dbname"
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

	// keepApplied is how many request ids a
	// channel document remembers, so that a request run twice (a crash
	// before its outcome was written) is applied once.
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
	if err := dbname.CheckSlug(s); err != nil {
		return fmt.Errorf("channel %w", err)
	}
	return nil
}

// UserChannelDB is the database of owner role's channel slug. It is derived
// from both, so no request can name another owner's database.
func (c *Channels) UserChannelDB(role, slug string) string {
	return DBName(c.opts.Prefix, "role:"+role, slug)
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
	db := c.opts.Client.DB(name)
	ref := doc.DB().Name() + "/" + doc.ID
	roles := u.roles()
	var state string
	_, _ = doc.Field("state", &state)
	prev := previousRoles(doc)
	inLine := state == StateReady && slices.Equal(prev, roles) && u.synced == u.name
	// A channel in line is rechecked with one read, its _security; only a
	// database found gone is provisioned again.
	provision := true
	if inLine {
		err := ensureSecurity(ctx, db, roles)
		switch {
		case err == nil:
			provision = false
		case !couch.IsNotFound(err):
			return workflow.Result{}, err
		default:
			c.log.Warn("channel database gone; provisioning it again", "id", ref, "database", name)
		}
	}
	if provision {
		if err := c.opts.Client.CreateDB(ctx, name); err != nil && !couch.IsPreconditionFailed(err) {
			return workflow.Result{}, fmt.Errorf("create database %s: %w", name, err)
		}
		if err := c.claimInfo(ctx, db, ref, u.name, u.role); err != nil {
			return workflow.Result{}, err
		}
		if err := ensureSecurity(ctx, db, roles); err != nil {
			return workflow.Result{}, err
		}
	}
	sd, recheck, err := c.seedOf(ctx, u, name)
	if err != nil {
		return workflow.Result{}, err
	}
	if inLine {
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
