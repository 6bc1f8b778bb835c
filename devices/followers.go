package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// Followers are what the users mode follows besides the control database:
// _users (sign-ups and the requests devices write on their own user
// documents) and every per-owner control database (revoke requests written
// by replication), and a loop that puts back whatever the set provisions
// when it goes missing or is changed by hand.
type Followers struct {
	d     *Devices
	users *workflow.Engine
	dbs   *supervisor.Supervisor
	every time.Duration
	batch int

	// cursor is the last trusted document id the previous heal pass
	// checked; the next pass goes on after it ("" : from the start). Only
	// the heal loop uses it.
	cursor string

	healed atomic.Int64
}

// FollowerOptions configure Followers.
type FollowerOptions struct {
	// Engine is the engine configuration of both followers (the daemon's
	// own, usually); Members and PassStateless are set here.
	Engine workflow.Options
	// Supervisor tunes the supervisor over the per-owner databases; its
	// Patterns and Engine are set here.
	Supervisor supervisor.Options
	// HealInterval is how often provisioning is checked and re-applied
	// (default 1m).
	HealInterval time.Duration
	// HealBatch is the most active devices one heal pass reads (default
	// 200), hence the owners it checks (at two requests each): a pass
	// costs the same with 50 owners or 50,000, and every owner is checked
	// once in ceil(devices/HealBatch) intervals. Checking every owner each
	// interval cost three requests per owner per minute, which at 5,000
	// owners (250 requests/s) is more than a test server can answer.
	HealBatch int
	// Handlers register further handlers on the engines of the per-owner
	// control databases, beside the revoke requests: the channel requests
	// of package channels (channels.Channels.RegisterUserDBs), or a user's
	// own. One supervisor follows each of those databases once for all.
	Handlers []func(*workflow.Registry) error
}

// NewFollowers builds the followers of the users mode.
func (d *Devices) NewFollowers(opts FollowerOptions) (*Followers, error) {
	if d.opts.Pairing != PairingUsers {
		return nil, errors.New("devices: followers run in the users pairing mode only")
	}
	if opts.HealInterval == 0 {
		opts.HealInterval = time.Minute
	}
	if opts.HealBatch == 0 {
		opts.HealBatch = 200
	}
	if opts.HealBatch < 1 {
		return nil, errors.New("devices: heal batch must be positive")
	}
	ureg := workflow.NewRegistry()
	if err := d.RegisterUsers(ureg); err != nil {
		return nil, err
	}
	eo := opts.Engine
	eo.Members = false
	eo.PassStateless = true
	users, err := workflow.New(d.opts.Client.DB(usersDB), ureg, eo)
	if err != nil {
		return nil, fmt.Errorf("devices: _users engine: %w", err)
	}
	dreg := workflow.NewRegistry()
	if err := d.RegisterUserDBs(dreg); err != nil {
		return nil, err
	}
	for _, register := range opts.Handlers {
		if err := register(dreg); err != nil {
			return nil, fmt.Errorf("devices: handlers of %s*: %w", UserDBPrefix, err)
		}
	}
	so := opts.Supervisor
	so.Patterns = []string{UserDBPrefix + "*"}
	so.Engine = opts.Engine
	so.Engine.PassStateless = false
	dbs, err := supervisor.New(d.opts.Client, dreg, so)
	if err != nil {
		return nil, fmt.Errorf("devices: supervisor of %s*: %w", UserDBPrefix, err)
	}
	return &Followers{d: d, users: users, dbs: dbs, every: opts.HealInterval, batch: opts.HealBatch}, nil
}

// Run follows until ctx ends and returns once everything it started has.
func (f *Followers) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, 2)
	wg.Go(func() { errs[0] = f.users.Run(ctx) })
	wg.Go(func() { errs[1] = f.dbs.Run(ctx) })
	wg.Go(func() { f.healLoop(ctx) })
	wg.Wait()
	return errors.Join(errs...)
}

// Ready is nil when both followers are.
func (f *Followers) Ready() error {
	if err := f.users.Ready(); err != nil {
		return fmt.Errorf("_users: %w", err)
	}
	if err := f.dbs.Ready(); err != nil {
		return fmt.Errorf("per-owner control databases: %w", err)
	}
	return nil
}

// Healed counts provisioning found missing or changed and put back.
func (f *Followers) Healed() int64 { return f.healed.Load() }

// UsersStats and UserDBStats are the followers' engine counters.
func (f *Followers) UsersStats() workflow.Stats  { return f.users.Stats() }
func (f *Followers) UserDBStats() workflow.Stats { return f.dbs.Stats() }

func (f *Followers) healLoop(ctx context.Context) {
	for {
		if n, err := f.Heal(ctx); err != nil && ctx.Err() == nil {
			f.d.log.Warn("provisioning check failed; next try in the heal interval", "err", err, "healed", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(f.every):
		}
	}
}

// Heal checks what the users mode provisions and puts back what is
// missing or changed: the control database's _security (server admins
// only) and, for the next HealBatch active devices after the previous
// pass's last (wrapping around at the end), their owners' control
// databases (the database itself, its _security, its validation function
// and, where one had to be put back, all of that owner's device entries).
// It returns how many databases it had to repair.
func (f *Followers) Heal(ctx context.Context) (int, error) {
	d := f.d
	n := 0
	changed, err := d.ProvisionControl(ctx)
	if err != nil {
		return n, err
	}
	if changed {
		n++
		d.log.Warn("control database provisioning was missing or changed; put back")
	}
	var owners []string
	seen := map[string]bool{}
	count, last := 0, f.cursor
	err = activeDevices(ctx, d, map[string]any{"_id": map[string]any{"$gt": f.cursor}}, f.batch, func(id string, _ map[string]any, owner string) {
		count, last = count+1, id
		if !seen[owner] {
			seen[owner] = true
			owners = append(owners, owner)
		}
	})
	if err != nil {
		return n, fmt.Errorf("list active devices: %w", err)
	}
	if count < f.batch {
		last = "" // the end: the next pass starts again
	}
	for _, owner := range owners {
		changed, err := d.ProvisionUserDB(ctx, owner)
		if err != nil {
			return n, err
		}
		if !changed {
			continue
		}
		// Re-created, or its _security or validation edited: the device
		// entries may be gone with it; all of them, not only this page's.
		var infos []map[string]any
		err = activeDevices(ctx, d, map[string]any{FieldOwner: owner}, 0, func(_ string, info map[string]any, _ string) {
			infos = append(infos, info)
		})
		if err != nil {
			return n, fmt.Errorf("list the owner's active devices: %w", err)
		}
		for _, info := range infos {
			if err := d.putDeviceInfo(ctx, owner, info); err != nil {
				return n, err
			}
		}
		n++
		f.healed.Add(1)
		d.log.Warn("an owner's control database was missing or changed; put back", "db", UserDBName(owner), "devices", len(infos))
	}
	f.cursor = last
	return n, nil
}

// activeDevices calls fn with each active trusted device document of the
// users mode matching extra (in _id order, at most limit; 0: all): its id,
// the entry it lists in its owner's control database, and its owner.
func activeDevices(ctx context.Context, d *Devices, extra map[string]any, limit int, fn func(id string, info map[string]any, owner string)) error {
	sel := map[string]any{"type": DocType, "state": StateActive, FieldPairingMode: PairingUsers}
	for k, v := range extra {
		sel[k] = v
	}
	fields := []string{"_id", FieldOwner, FieldCouchUser, FieldDeviceName, FieldActivatedAt}
	each := func(raw json.RawMessage) error {
		var m map[string]any
		if json.Unmarshal(raw, &m) != nil {
			return nil
		}
		id, _ := m["_id"].(string)
		owner, _ := m[FieldOwner].(string)
		user, _ := m[FieldCouchUser].(string)
		name, _ := m[FieldDeviceName].(string)
		if owner == "" || user == "" {
			return nil
		}
		fn(id, map[string]any{
			"_id": TrustedID(user), "type": DeviceInfoType, "state": StateActive,
			FieldCouchUser: user, FieldDeviceName: name, FieldActivatedAt: m[FieldActivatedAt],
		}, owner)
		return nil
	}
	if limit == 0 {
		_, err := couch.FindEach(ctx, d.opts.DB, sel, fields, each)
		return err
	}
	// One page, in _id order from the cursor: Mango sorts by _id without
	// an index.
	rows := d.opts.DB.Find(ctx, map[string]any{"selector": sel, "fields": fields,
		"sort": []map[string]string{{"_id": "asc"}}, "limit": limit})
	defer rows.Close()
	// Iterator, as couch.FindEach reads a page.
	for row, err := range rows.Iterator() {
		if err != nil {
			return err
		}
		var raw json.RawMessage
		if row.ScanDoc(&raw) == nil {
			_ = each(raw)
		}
	}
	return nil
}
