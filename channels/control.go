package channels

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/identity"
	"github.com/docstate/docstate/workflow"
)

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
