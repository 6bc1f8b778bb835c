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
	return &Followers{d: d, users: users, dbs: dbs, every: opts.HealInterval}, nil
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

// Heal checks everything the users mode provisions and puts back what is
// missing or changed: the control database's _security (server admins
// only) and every active owner's control database (the database itself,
// its _security, its validation function and the device entries). It
// returns how many databases it had to repair.
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
	owners := map[string][]map[string]any{}
	_, err = couch.FindEach(ctx, d.opts.DB,
		map[string]any{"type": DocType, "state": StateActive, FieldPairingMode: PairingUsers},
		[]string{"_id", FieldOwner, FieldCouchUser, FieldDeviceName, FieldActivatedAt},
		func(raw json.RawMessage) error {
			var v struct {
				Owner, CouchUser, DeviceName string
				ActivatedAt                  any
			}
			var m map[string]any
			if json.Unmarshal(raw, &m) != nil {
				return nil
			}
			v.Owner, _ = m[FieldOwner].(string)
			v.CouchUser, _ = m[FieldCouchUser].(string)
			v.DeviceName, _ = m[FieldDeviceName].(string)
			if v.Owner == "" || v.CouchUser == "" {
				return nil
			}
			owners[v.Owner] = append(owners[v.Owner], map[string]any{
				"_id": TrustedID(v.CouchUser), "type": DeviceInfoType, "state": StateActive,
				FieldCouchUser: v.CouchUser, FieldDeviceName: v.DeviceName, FieldActivatedAt: m[FieldActivatedAt],
			})
			return nil
		})
	if err != nil {
		return n, fmt.Errorf("list active devices: %w", err)
	}
	for owner, infos := range owners {
		changed, err := d.ProvisionUserDB(ctx, owner)
		if err != nil {
			return n, err
		}
		if !changed {
			continue
		}
		// Re-created, or its _security or validation edited: the device
		// entries may be gone with it.
		for _, info := range infos {
			if err := d.putDeviceInfo(ctx, owner, info); err != nil {
				return n, err
			}
		}
		n++
		f.healed.Add(1)
		d.log.Warn("an owner's control database was missing or changed; put back", "db", UserDBName(owner), "devices", len(infos))
	}
	return n, nil
}
