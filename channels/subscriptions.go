package channels

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/identity"
	"github.com/docstate/docstate/workflow"
)

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
		_, err := couch.FindEach(ctx, c.opts.DB,
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
		_, err := couch.FindEach(ctx, c.opts.Client.DB(name),
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
