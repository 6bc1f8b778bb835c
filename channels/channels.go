package channels

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

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
