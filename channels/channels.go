package channels

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/identity"
	"github.com/docstate/docstate/workflow"
)

// Document types, states and fields.
const (
	DocType = "channel"

	StateNew      = "new"
	StateReady    = "ready"
	StateDeleting = "deleting"
	StateDeleted  = "deleted"

	// SubscriptionType is the type of the subscription documents the daemon
	// writes into the control database, one per channel and device.
	SubscriptionType = "subscription"
	// InfoDocID is the description document in each channel database.
	InfoDocID = "channel"
	// InfoType is its type.
	InfoType = "channel-info"

	FieldOwner           = "owner"
	FieldName            = "name"
	FieldMembers         = "members"
	FieldDeleteRequested = "delete_requested"
	FieldDatabase        = "database"
	FieldURL             = "url"
	FieldMemberRoles     = "member_roles"
	FieldSubscriptions   = "subscriptions"
	FieldProvisionedAt   = "provisioned_at"
	FieldDeletedAt       = "deleted_at"
)

// OnDelete policies for a deleted channel's database.
const (
	DeleteDatabase  = "delete"
	ArchiveDatabase = "archive"
)

// Options configure the channel handlers. Zero values take the defaults
// named per field.
type Options struct {
	// Client is a server admin client: it creates databases and sets
	// their _security.
	Client *kivik.Client
	// DB is the control database the engine watches: channel documents
	// live there, device documents are read from it and subscription
	// documents are written into it.
	DB *kivik.DB
	// Prefix starts every channel database name (default "channel-").
	Prefix string
	// PublicURL is the server's URL as devices reach it; subscriptions
	// carry PublicURL/<database>. Empty: subscriptions name the database
	// only.
	PublicURL string
	// OnDelete is DeleteDatabase (default) or ArchiveDatabase: keep the
	// data, readable by server admins only.
	OnDelete string
	// UserDBs places the subscriptions of devices paired through their
	// own users (identity.PairingUsers) in their owner's control database,
	// where those devices look, instead of the shared control database.
	UserDBs bool
	// ReconcileInterval is how often a ready channel re-checks its
	// _security and subscriptions against its members and their active
	// devices (default 1m): devices activated since get the channel
	// within it.
	ReconcileInterval time.Duration
	// MaxMembers bounds a channel's member list (default 100).
	MaxMembers int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// OnProvisioned, when set, is called each time a channel database was
	// created (or found) and its _security verified, for metrics.
	OnProvisioned func()
	// OnSubscribed, when set, is called for each subscription written
	// into a member's control database for a channel asked for by
	// replication: the member's role and the channel's database. For
	// metrics, and for the benchmark's request-to-subscription latency.
	OnSubscribed func(role, database string)
	// Templates are the databases a channel asked for by replication may
	// be seeded from, by name (a create request's "template"). Seeding is
	// server-side replication (a _replicator document per channel), so
	// Replicator must be set with them.
	Templates map[string]string
	// Replicator is how the server reaches itself for those replications.
	Replicator Replicator
	// OnSeed, when set, is called each time a channel's recorded seed
	// state changes, with the new state, for metrics.
	OnSeed func(state string)
}

// Channels holds the channel handlers.
type Channels struct {
	opts Options
	log  *slog.Logger
	// beforeSubscriptionWrites, set by tests only, runs after a reconcile
	// has read the subscriptions it wants and has, just before it writes:
	// the window in which another daemon can finish deleting the channel,
	// which a test could not hit reliably otherwise.
	beforeSubscriptionWrites func()
	// roleLocks serialise, per member role (by stripe), the invitation
	// list and subscription writes of channels asked for by replication.
	roleLocks [64]sync.Mutex
	// http reads the replication scheduler, which kivik has no call for.
	http *http.Client
}

// New checks opts and returns the handlers.
func New(opts Options) (*Channels, error) {
	if opts.Prefix == "" {
		opts.Prefix = "channel-"
	}
	if opts.OnDelete == "" {
		opts.OnDelete = DeleteDatabase
	}
	if opts.ReconcileInterval == 0 {
		opts.ReconcileInterval = time.Minute
	}
	if opts.MaxMembers == 0 {
		opts.MaxMembers = 100
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	var errs []error
	if opts.Client == nil || opts.DB == nil {
		errs = append(errs, errors.New("client and control db are required"))
	}
	if err := CheckPrefix(opts.Prefix); err != nil {
		errs = append(errs, err)
	}
	if opts.OnDelete != DeleteDatabase && opts.OnDelete != ArchiveDatabase {
		errs = append(errs, fmt.Errorf("on delete policy %q must be %q or %q", opts.OnDelete, DeleteDatabase, ArchiveDatabase))
	}
	if opts.PublicURL != "" {
		u, err := url.Parse(opts.PublicURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" {
			errs = append(errs, fmt.Errorf("public url %q must be an absolute http(s) URL without credentials or query", opts.PublicURL))
		}
		opts.PublicURL = strings.TrimRight(opts.PublicURL, "/")
	}
	if opts.ReconcileInterval < time.Second || opts.MaxMembers < 1 {
		errs = append(errs, errors.New("reconcile interval must be at least 1s and max members positive"))
	}
	if err := CheckTemplates(opts.Templates); err != nil {
		errs = append(errs, err)
	}
	if len(opts.Templates) > 0 {
		u, err := url.Parse(opts.Replicator.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
			errs = append(errs, errors.New("templates need the replicator's server URL (http(s), credentials apart)"))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("channels: %w", err)
	}
	return &Channels{opts: opts, log: opts.Logger, http: &http.Client{Timeout: 30 * time.Second}}, nil
}

// Register registers the channel handlers. All are Safe: every step is
// idempotent (create-if-absent, set-and-verify, stable subscription ids),
// so a repeat after a crash or on a second daemon changes nothing.
func (c *Channels) Register(reg *workflow.Registry) error {
	for _, s := range []workflow.Spec{
		{Type: DocType, State: StateNew, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleNew)},
		{Type: DocType, State: StateReady, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleReady)},
		{Type: DocType, State: StateDeleting, Mode: workflow.Safe, Handler: workflow.HandlerFunc(c.handleDeleting)},
	} {
		if err := reg.Register(s); err != nil {
			return fmt.Errorf("channels: %w", err)
		}
	}
	return nil
}

// channel is a channel document's request fields, validated.
type channel struct {
	owner           string
	name            string
	members         []string // without the owner, deduplicated, lower-cased
	deleteRequested bool
	database        string // recorded once provisioned
}

// roles are the CouchDB roles admitted to the channel: the owner's and
// every member's device role, sorted.
func (ch channel) roles() []string {
	out := []string{identity.OwnerRole(ch.owner)}
	for _, m := range ch.members {
		out = append(out, identity.OwnerRole(m))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// parse validates the request fields; every problem is a terminal error
// with a reason naming the field.
func (c *Channels) parse(doc *workflow.Doc) (channel, error) {
	var ch channel
	str := func(field string, dst *string) error {
		raw, ok := rawField(doc, field)
		if !ok {
			return fmt.Errorf("%s is missing", field)
		}
		if err := json.Unmarshal(raw, dst); err != nil || raw[0] != '"' {
			return fmt.Errorf("%s must be a string", field)
		}
		return nil
	}
	var errs []error
	if err := str(FieldOwner, &ch.owner); err != nil {
		errs = append(errs, err)
	} else if err := identity.CheckEmail(ch.owner); err != nil {
		errs = append(errs, fmt.Errorf("owner %w", err))
	}
	if err := str(FieldName, &ch.name); err != nil {
		errs = append(errs, err)
	} else if err := CheckName(ch.name); err != nil {
		errs = append(errs, err)
	}
	if raw, ok := rawField(doc, FieldMembers); ok {
		var members []json.RawMessage
		if err := json.Unmarshal(raw, &members); err != nil {
			errs = append(errs, errors.New("members must be an array of email addresses"))
		} else if len(members) > c.opts.MaxMembers {
			errs = append(errs, fmt.Errorf("members lists %d addresses, more than %d", len(members), c.opts.MaxMembers))
		} else {
			for i, m := range members {
				var s string
				if len(m) == 0 || m[0] != '"' || json.Unmarshal(m, &s) != nil {
					errs = append(errs, fmt.Errorf("members[%d] must be a string", i))
					continue
				}
				if err := identity.CheckEmail(s); err != nil {
					errs = append(errs, fmt.Errorf("members[%d] %w", i, err))
					continue
				}
				ch.members = append(ch.members, strings.ToLower(s))
			}
		}
	}
	if raw, ok := rawField(doc, FieldDeleteRequested); ok {
		if err := json.Unmarshal(raw, &ch.deleteRequested); err != nil {
			errs = append(errs, errors.New("delete_requested must be true or false"))
		}
	}
	if raw, ok := rawField(doc, FieldDatabase); ok {
		if json.Unmarshal(raw, &ch.database) != nil || !strings.HasPrefix(ch.database, c.opts.Prefix) {
			errs = append(errs, fmt.Errorf("database must be a string starting with %q (written by docstate)", c.opts.Prefix))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return channel{}, workflow.Terminal(fmt.Errorf("invalid channel document: %w", err))
	}
	slices.Sort(ch.members)
	ch.members = slices.Compact(ch.members)
	return ch, nil
}

// rawField returns a top-level field's JSON, absent when missing or null.
func rawField(doc *workflow.Doc, field string) (json.RawMessage, bool) {
	var raw json.RawMessage
	ok, err := doc.Field(field, &raw)
	if err != nil || !ok || len(raw) == 0 {
		return nil, false
	}
	return raw, true
}

// handleNew creates the channel database, claims it with its description
// document, secures it and proves the _security took, then moves to ready.
func (c *Channels) handleNew(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	ch, err := c.parse(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	if ch.deleteRequested {
		return workflow.Transition(StateDeleting), nil
	}
	name := DBName(c.opts.Prefix, ch.owner, ch.name)
	if err := c.opts.Client.CreateDB(ctx, name); err != nil && !couch.IsPreconditionFailed(err) {
		return workflow.Result{}, fmt.Errorf("create database %s: %w", name, err)
	}
	db := c.opts.Client.DB(name)
	// The description document claims the database for this channel
	// document before _security is set: another channel document that
	// derives the same name (same owner, same name) must not get to set
	// its members on it.
	if err := c.claimInfo(ctx, db, doc.ID, ch.name, identity.OwnerRole(ch.owner)); err != nil {
		return workflow.Result{}, err
	}
	roles := ch.roles()
	if err := ensureSecurity(ctx, db, roles); err != nil {
		return workflow.Result{}, err
	}
	if c.opts.OnProvisioned != nil {
		c.opts.OnProvisioned()
	}
	c.log.Info("channel provisioned", "id", doc.ID, "database", name, "members", len(roles))
	res := workflow.Transition(StateReady).
		Set(FieldDatabase, name).
		Set(FieldMemberRoles, roles).
		Set(FieldProvisionedAt, time.Now().UTC().Format(time.RFC3339))
	if c.opts.PublicURL != "" {
		res = res.Set(FieldURL, c.opts.PublicURL+"/"+name)
	}
	return res, nil
}

// claimInfo writes the channel database's description document, or checks
// that the one there belongs to this channel document.
func (c *Channels) claimInfo(ctx context.Context, db *kivik.DB, channelID, name, ownerRole string) error {
	info := map[string]any{
		"_id": InfoDocID, "type": InfoType, "channel_doc": channelID,
		"name": name, "owner_role": ownerRole,
	}
	for range 5 {
		var cur struct {
			Rev     string `json:"_rev"`
			Channel string `json:"channel_doc"`
			Name    string `json:"name"`
		}
		err := db.Get(ctx, InfoDocID).ScanDoc(&cur)
		switch {
		case couch.IsNotFound(err):
			delete(info, "_rev")
		case err != nil:
			return fmt.Errorf("read %s/%s: %w", db.Name(), InfoDocID, err)
		case cur.Channel != channelID:
			return workflow.Terminal(fmt.Errorf("database %s already belongs to channel document %q: the same owner has a channel of this name", db.Name(), cur.Channel))
		case cur.Name == name:
			return nil
		default:
			info["_rev"] = cur.Rev
		}
		_, err = db.Put(ctx, InfoDocID, info)
		if couch.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %s/%s: %w", db.Name(), InfoDocID, err)
		}
		return nil
	}
	return fmt.Errorf("write %s/%s: kept conflicting", db.Name(), InfoDocID)
}

// handleReady keeps a provisioned channel in line with its document:
// _security lists exactly the owner's and members' roles, and every active
// device of theirs has a subscription, no one else. It wakes every
// ReconcileInterval to pick up devices activated or revoked since.
func (c *Channels) handleReady(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	ch, err := c.parse(doc)
	if err != nil {
		return workflow.Result{}, err
	}
	if ch.deleteRequested {
		return workflow.Transition(StateDeleting), nil
	}
	if ch.database == "" {
		return workflow.Result{}, workflow.Terminal(errors.New("ready channel has no database field"))
	}
	roles := ch.roles()
	if err := ensureSecurity(ctx, c.opts.Client.DB(ch.database), roles); err != nil {
		return workflow.Result{}, err
	}
	n, written, err := c.reconcileSubscriptions(ctx, doc.ID, ch.database, roles, previousRoles(doc))
	// The final check runs even when some writes failed: the ones that
	// succeeded may already outlive a deletion.
	if len(written) > 0 {
		withdrawn, werr := c.withdrawIfNotReady(ctx, doc.ID, written)
		if werr != nil {
			return workflow.Result{}, errors.Join(err, werr)
		}
		if withdrawn {
			// The document moved on; its new state's handler (or none,
			// once deleted) decides what happens next.
			return workflow.Stay(), nil
		}
	}
	if err != nil {
		return workflow.Result{}, err
	}
	return workflow.Stay().
		Set(FieldMemberRoles, roles).
		Set(FieldSubscriptions, n).
		RecheckAfter(c.opts.ReconcileInterval), nil
}

// handleDeleting removes every subscription, then deletes or archives the
// database. Each step is idempotent, so a crash half way repeats cleanly.
func (c *Channels) handleDeleting(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	var database string
	if raw, ok := rawField(doc, FieldDatabase); ok {
		if json.Unmarshal(raw, &database) != nil || !strings.HasPrefix(database, c.opts.Prefix) {
			return workflow.Result{}, workflow.Terminal(fmt.Errorf("database must be a string starting with %q", c.opts.Prefix))
		}
	}
	derived := false
	if database == "" {
		var err error
		if database, err = c.unrecordedDatabase(ctx, doc); err != nil {
			return workflow.Result{}, err
		}
		derived = database != ""
	}
	if _, _, err := c.reconcileSubscriptions(ctx, doc.ID, database, nil, previousRoles(doc)); err != nil {
		return workflow.Result{}, err
	}
	if database != "" {
		switch c.opts.OnDelete {
		case ArchiveDatabase:
			err := ensureSecurity(ctx, c.opts.Client.DB(database), nil)
			if err != nil && !couch.IsNotFound(err) {
				return workflow.Result{}, err
			}
		default:
			if err := c.opts.Client.DestroyDB(ctx, database); err != nil && !couch.IsNotFound(err) {
				return workflow.Result{}, fmt.Errorf("delete database %s: %w", database, err)
			}
		}
	}
	c.log.Info("channel deleted", "id", doc.ID, "database", database, "policy", c.opts.OnDelete)
	res := workflow.Transition(StateDeleted).
		Set(FieldDeletedAt, time.Now().UTC().Format(time.RFC3339)).
		Set(FieldSubscriptions, 0)
	if derived {
		// Recorded so that an archived database can be found from the
		// channel document, as for one provisioned to the end.
		res = res.Set(FieldDatabase, database)
	}
	return res, nil
}

// unrecordedDatabase finds the database of a channel document that has no
// database field: a daemon that died after handleNew created, claimed and
// secured it, but before ready was written, left a database that only the
// derived name leads to, and a delete request moves such a document from
// new straight to deleting. It returns that name only if the database's
// description document names this channel document: a database of the
// same name claimed by another channel document (same owner, same name) is
// that channel's, and one without a description may be one that another
// channel document is creating right now; neither may be touched. "" when
// there is nothing of this channel document's to remove.
func (c *Channels) unrecordedDatabase(ctx context.Context, doc *workflow.Doc) (string, error) {
	var owner, name string
	if raw, ok := rawField(doc, FieldOwner); !ok || json.Unmarshal(raw, &owner) != nil || identity.CheckEmail(owner) != nil {
		return "", nil // handleNew refuses such a document before creating anything
	}
	if raw, ok := rawField(doc, FieldName); !ok || json.Unmarshal(raw, &name) != nil || CheckName(name) != nil {
		return "", nil
	}
	database := DBName(c.opts.Prefix, owner, name)
	var info struct {
		Channel string `json:"channel_doc"`
	}
	err := c.opts.Client.DB(database).Get(ctx, InfoDocID).ScanDoc(&info)
	switch {
	case couch.IsNotFound(err):
		// No such database, or never claimed: nothing of ours.
		return "", nil
	case err != nil:
		return "", fmt.Errorf("read %s/%s: %w", database, InfoDocID, err)
	case info.Channel != doc.ID:
		c.log.Info("channel deleted before ready: its derived database belongs to another channel document, left alone",
			"id", doc.ID, "database", database, "owner_doc", info.Channel)
		return "", nil
	}
	return database, nil
}

// adminOnly is the member role of an archived channel: no user has it
// (server admins pass _security anyway). An empty members list would make
// the database public in CouchDB.
const adminOnly = "_admin"

// ensureSecurity makes the database's _security admit exactly roles as
// members (none: server admins only), with no database admins, and reads
// it back to prove it took.
func ensureSecurity(ctx context.Context, db *kivik.DB, roles []string) error {
	if len(roles) == 0 {
		roles = []string{adminOnly}
	}
	want := &kivik.Security{
		Admins:  kivik.Members{Names: []string{}, Roles: []string{}},
		Members: kivik.Members{Names: []string{}, Roles: roles},
	}
	cur, err := db.Security(ctx)
	if err != nil {
		return fmt.Errorf("read _security of %s: %w", db.Name(), err)
	}
	if sameSecurity(cur, want) {
		return nil
	}
	if err := db.SetSecurity(ctx, want); err != nil {
		return fmt.Errorf("set _security of %s: %w", db.Name(), err)
	}
	got, err := db.Security(ctx)
	if err != nil {
		return fmt.Errorf("read back _security of %s: %w", db.Name(), err)
	}
	if !sameSecurity(got, want) {
		return fmt.Errorf("_security of %s did not take: members %v, want %v", db.Name(), got.Members, want.Members)
	}
	return nil
}

func sameSecurity(a, b *kivik.Security) bool {
	set := func(s []string) []string {
		s = slices.Clone(s)
		slices.Sort(s)
		return slices.Compact(s)
	}
	return a != nil && b != nil &&
		slices.Equal(set(a.Members.Roles), set(b.Members.Roles)) && slices.Equal(set(a.Members.Names), set(b.Members.Names)) &&
		slices.Equal(set(a.Admins.Roles), set(b.Admins.Roles)) && slices.Equal(set(a.Admins.Names), set(b.Admins.Names))
}

// SubscriptionID is the stable id of the subscription of a device to a
// channel: two daemons, or a repeat, write the same document.
func SubscriptionID(channelDocID, deviceDocID string) string {
	sum := sha256.Sum256([]byte(channelDocID + "\x00" + deviceDocID))
	return SubscriptionType + ":" + hex.EncodeToString(sum[:16])
}

// subscription is what a device reads to start its own replication of a
// channel, both ways.
type subscription struct {
	ID        string `json:"_id"`
	Rev       string `json:"_rev,omitempty"`
	Type      string `json:"type"`
	Channel   string `json:"channel"`
	Device    string `json:"device"`
	OwnerRole string `json:"owner_role"`
	CouchUser string `json:"couch_user,omitempty"`
	Database  string `json:"database"`
	URL       string `json:"url,omitempty"`
	Direction string `json:"direction"`
}

func (s subscription) same(o subscription) bool {
	s.Rev, o.Rev = "", ""
	return s == o
}

// withdrawIfNotReady is the final check of a reconcile that wrote
// subscriptions (written: id → new revision): it reads the channel
// document again and, if it is no longer ready (deleting, deleted, another
// state, or gone), deletes those subscriptions and reports true.
//
// This closes the race with a deletion on another daemon. The deletion
// first writes state deleting, then sweeps the subscriptions; a reconcile
// first writes its subscriptions, then reads the state. In whatever order
// these land on the server, one side sees the other's write: the sweep
// finds the subscriptions, or this read finds the channel no longer ready.
// Making the deletion's sweep more thorough instead cannot guarantee it: a
// reconcile that read the channel before the deletion may write at any
// later time (a request can even be applied after its context ended), so
// no sweep or grace period is late enough. What remains: a daemon that
// dies between its write and this check leaves its subscriptions behind.
//
// Errors are retried here, not left to the engine: once the document has
// moved on, the engine drops this run's result and error, and a deleted
// channel has no handler to retry.
func (c *Channels) withdrawIfNotReady(ctx context.Context, channelID string, written map[placed]string) (bool, error) {
	var err error
	for attempt := range 3 {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return false, fmt.Errorf("withdraw subscriptions of %s: %w (after %w)", channelID, ctx.Err(), err)
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
		var withdrawn bool
		if withdrawn, err = c.withdrawOnce(ctx, channelID, written); err == nil {
			return withdrawn, nil
		}
	}
	return false, err
}

func (c *Channels) withdrawOnce(ctx context.Context, channelID string, written map[placed]string) (bool, error) {
	var cur struct {
		State string `json:"state"`
	}
	err := c.opts.DB.Get(ctx, channelID).ScanDoc(&cur)
	switch {
	case couch.IsNotFound(err):
		// Hard-deleted meanwhile: no longer ready either.
	case err != nil:
		return false, fmt.Errorf("re-read channel %s: %w", channelID, err)
	case cur.State == StateReady:
		return false, nil
	}
	deletes := map[string][]any{}
	for at, rev := range written {
		deletes[at.db] = append(deletes[at.db], map[string]any{"_id": at.id, "_rev": rev, "_deleted": true})
	}
	for name, docs := range deletes {
		results, err := c.opts.Client.DB(name).BulkDocs(ctx, docs)
		if err != nil {
			return false, fmt.Errorf("withdraw subscriptions of %s: %w", channelID, err)
		}
		for _, r := range results {
			// A conflict means the sweep deleted it already, or another
			// reconcile wrote a newer revision, which that reconcile's own
			// final check withdraws.
			if r.Error != nil && !couch.IsConflict(r.Error) && !couch.IsNotFound(r.Error) {
				return false, fmt.Errorf("withdraw subscription %s: %w", r.ID, r.Error)
			}
		}
	}
	c.log.Info("channel left ready while its subscriptions were written: withdrawn",
		"id", channelID, "state", cur.State, "subscriptions", len(written))
	return true, nil
}

// reconcileSubscriptions makes the channel's subscriptions exactly one per
// active device whose role is in roles (none: remove them all). A device
// paired through its own user (devices users mode) finds its subscription
// in its owner's control database; any other device in the control
// database. lookIn are further roles whose owners' control databases may
// still hold subscriptions of this channel (members removed since, or every
// member when deleting). It returns how many there are, and the ones it
// created or updated (where → revision) for handleReady's final check.
func (c *Channels) reconcileSubscriptions(ctx context.Context, channelID, database string, roles, lookIn []string) (int, map[placed]string, error) {
	control := c.opts.DB.Name()
	want := map[placed]subscription{}
	if len(roles) > 0 {
		_, err := workflow.FindEach(ctx, c.opts.DB,
			map[string]any{"type": identity.DeviceType, "state": identity.StateActive},
			[]string{"_id", identity.FieldOwnerRole, identity.FieldCouchUser, identity.FieldPairingMode},
			func(raw json.RawMessage) error {
				var d struct {
					ID        string `json:"_id"`
					OwnerRole string `json:"owner_role"`
					CouchUser string `json:"couch_user"`
					Mode      string `json:"pairing_mode"`
				}
				if json.Unmarshal(raw, &d) != nil || !slices.Contains(roles, d.OwnerRole) {
					return nil
				}
				s := subscription{
					ID: SubscriptionID(channelID, d.ID), Type: SubscriptionType, Channel: channelID, Device: d.ID,
					OwnerRole: d.OwnerRole, CouchUser: d.CouchUser, Database: database, Direction: "both",
				}
				if c.opts.PublicURL != "" {
					s.URL = c.opts.PublicURL + "/" + database
				}
				where := control
				if c.opts.UserDBs && d.Mode == identity.PairingUsers {
					where = userDBOfRole(d.OwnerRole)
				}
				want[placed{where, s.ID}] = s
				return nil
			})
		if err != nil {
			return 0, nil, fmt.Errorf("list active devices: %w", err)
		}
	}
	dbs := []string{control}
	if c.opts.UserDBs {
		for _, r := range append(slices.Clone(roles), lookIn...) {
			if db := userDBOfRole(r); db != "" && !slices.Contains(dbs, db) {
				dbs = append(dbs, db)
			}
		}
	}
	have := map[placed]subscription{}
	for _, name := range dbs {
		_, err := workflow.FindEach(ctx, c.opts.Client.DB(name),
			map[string]any{"type": SubscriptionType, "channel": channelID}, nil,
			func(raw json.RawMessage) error {
				var s subscription
				if json.Unmarshal(raw, &s) == nil {
					have[placed{name, s.ID}] = s
				}
				return nil
			})
		if err != nil && !(name != control && couch.IsNotFound(err)) {
			return 0, nil, fmt.Errorf("list subscriptions in %s: %w", name, err)
		}
	}
	writes := map[string][]any{}
	for at, s := range want {
		if cur, ok := have[at]; ok {
			if cur.same(s) {
				continue
			}
			s.Rev = cur.Rev
		}
		writes[at.db] = append(writes[at.db], s)
	}
	for at, cur := range have {
		if _, ok := want[at]; !ok {
			writes[at.db] = append(writes[at.db], map[string]any{"_id": at.id, "_rev": cur.Rev, "_deleted": true})
		}
	}
	if len(writes) == 0 {
		return len(want), nil, nil
	}
	if c.beforeSubscriptionWrites != nil {
		c.beforeSubscriptionWrites()
	}
	// Every row is looked at before an error is returned: the caller's
	// final check needs all that was written, even when some row failed.
	written := map[placed]string{}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(writes)) {
		results, err := c.opts.Client.DB(name).BulkDocs(ctx, writes[name])
		if err != nil {
			errs = append(errs, fmt.Errorf("write subscriptions in %s: %w", name, err))
			continue
		}
		for _, r := range results {
			switch {
			case r.Error != nil && couch.IsConflict(r.Error):
				// Another daemon wrote the same stable id meanwhile: the
				// next reconcile compares again.
			case r.Error != nil:
				errs = append(errs, fmt.Errorf("write subscription %s: %w", r.ID, r.Error))
			case r.Rev == "":
				errs = append(errs, fmt.Errorf("write subscription %s: the server answered without a revision", r.ID))
			default:
				if _, ok := want[placed{name, r.ID}]; ok {
					written[placed{name, r.ID}] = r.Rev
				}
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return 0, written, err
	}
	return len(want), written, nil
}

// placed is a subscription document's database and id.
type placed struct{ db, id string }

// userDBOfRole is the control database of the owner whose role is role.
func userDBOfRole(role string) string { return identity.UserDBOfRole(role) }

// previousRoles are the member roles the last reconcile recorded: their
// owners' control databases may hold subscriptions to take back.
func previousRoles(doc *workflow.Doc) []string {
	var roles []string
	if raw, ok := rawField(doc, FieldMemberRoles); ok {
		_ = json.Unmarshal(raw, &roles)
	}
	return roles
}
