package channels

import (
	"context"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"strings"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// invite is what a member's subscription is made from.
type invite struct {
	Channel   string `json:"channel"` // <owner's control database>/<channel document id>
	Name      string `json:"name"`
	OwnerRole string `json:"owner_role"`
	Database  string `json:"database"`
	URL       string `json:"url,omitempty"`
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
	if err := c.syncMember(ctx, role, nil); err != nil {
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
	list, err := c.updateInvites(ctx, role, change)
	if err != nil {
		return err
	}
	return c.syncMember(ctx, role, &list)
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
// It returns the list as it now stands, with its revision.
func (c *Channels) updateInvites(ctx context.Context, role string, change func(map[string]invite)) (invitesDoc, error) {
	for range writeTries {
		d, err := c.readInvites(ctx, role)
		if err != nil {
			return d, err
		}
		before := maps.Clone(d.Channels)
		change(d.Channels)
		if maps.Equal(before, d.Channels) || d.Rev == "" && len(d.Channels) == 0 {
			d.Channels = before
			return d, nil
		}
		rev, err := c.opts.DB.Put(ctx, d.ID, d)
		if couch.IsConflict(err) {
			continue
		} else if err != nil {
			return d, fmt.Errorf("write %s: %w", d.ID, err)
		}
		d.Rev = rev
		return d, nil
	}
	return invitesDoc{}, fmt.Errorf("write %s%s: kept conflicting", invitesPrefix, role)
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
//
// known, when set, is the list as just read or written, which saves the
// first read.
func (c *Channels) syncMember(ctx context.Context, role string, known *invitesDoc) error {
	udb := userDBOfRole(role)
	if udb == "" {
		return nil
	}
	db := c.opts.Client.DB(udb)
	for range writeTries {
		var inv invitesDoc
		if known != nil {
			inv, known = *known, nil
		} else {
			var err error
			if inv, err = c.readInvites(ctx, role); err != nil {
				return err
			}
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
