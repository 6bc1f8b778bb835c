package channels_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/channels"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// A channel asked for in an owner's control database: once it is in line,
// rechecks write nothing anywhere (no revision of the channel, the
// subscriptions or the invitation lists: devices replicate every one); and
// a request run a second time, as after a crash before its outcome was
// written, changes the channel once, even after a later request undid it.
func TestUserChannelIdleWritesNothingAndRequestsApplyOnce(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	tag := control.Name()
	alice, bob, carol := "alice-"+tag+"@example.com", "bob-"+tag+"@example.com", "carol-"+tag+"@example.com"
	aDB, bDB := admin.DB(devices.UserDBName(alice)), admin.DB(devices.UserDBName(bob))
	for _, db := range []*kivik.DB{aDB, bDB} {
		if err := admin.CreateDB(ctx, db.Name()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = admin.DestroyDB(context.Background(), db.Name()) })
	}
	ch, err := channels.New(channels.Options{Client: admin, DB: control, Prefix: prefixFor(control),
		ReconcileInterval: time.Second, Logger: workflowtest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	reg := workflow.NewRegistry()
	if err := ch.RegisterUserDBs(reg); err != nil {
		t.Fatal(err)
	}
	workflowtest.Start(t, aDB, reg, workflowtest.Options(t))

	request := func(id, action string, fields map[string]any) {
		t.Helper()
		doc := map[string]any{"type": channels.RequestType, "state": "new", "action": action, "channel": "notes"}
		for k, v := range fields {
			doc[k] = v
		}
		if _, err := aDB.Put(ctx, id, doc); err != nil {
			t.Fatal(err)
		}
		waitState(t, aDB, id, channels.StateApplied)
	}
	request("channel_request:a", channels.ActionCreate, map[string]any{"name": "Notes", "members": []string{bob}})
	c := waitState(t, aDB, "channel:notes", channels.StateReady)
	sub := channels.UserSubscriptionPrefix + c.Database
	workflowtest.Eventually(t, 15*time.Second, "both subscriptions", func() (bool, string) {
		_, aErr := aDB.Get(ctx, sub).Rev()
		_, bErr := bDB.Get(ctx, sub).Rev()
		return aErr == nil && bErr == nil, fmt.Sprint(aErr, bErr)
	})

	revs := func() map[string]string {
		out := map[string]string{}
		for _, db := range []*kivik.DB{aDB, bDB, control} {
			rows := db.AllDocs(ctx)
			for rows.Next() {
				id, _ := rows.ID()
				rev, _ := rows.Rev()
				out[db.Name()+"/"+id] = rev
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
		}
		return out
	}
	before := revs()
	time.Sleep(3500 * time.Millisecond) // three rechecks
	if after := revs(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("idle rechecks wrote:\nbefore %v\nafter  %v", before, after)
	}

	request("channel_request:b", channels.ActionAddMembers, map[string]any{"members": []string{carol}})
	request("channel_request:c", channels.ActionRemoveMembers, map[string]any{"members": []string{carol}})
	// Run b again: its outcome "lost", as if the daemon died before writing it.
	var b map[string]any
	if err := aDB.Get(ctx, "channel_request:b").ScanDoc(&b); err != nil {
		t.Fatal(err)
	}
	// The channel settles first: its ready handler records the roles.
	var chRev string
	workflowtest.Eventually(t, 15*time.Second, "carol's role gone", func() (bool, string) {
		c := getChannel(t, aDB, "channel:notes")
		chRev = c.Rev
		return !slices.Contains(c.MemberRoles, devices.OwnerRole(carol)) && len(c.MemberRoles) == 2, fmt.Sprint(c.MemberRoles)
	})
	b["state"] = "new"
	if _, err := aDB.Put(ctx, "channel_request:b", b); err != nil {
		t.Fatal(err)
	}
	waitState(t, aDB, "channel_request:b", channels.StateApplied)
	var got struct {
		Rev     string   `json:"_rev"`
		Members []string `json:"members"`
	}
	if err := aDB.Get(ctx, "channel:notes").ScanDoc(&got); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(got.Members, carol) || got.Rev != chRev {
		t.Fatalf("request b applied twice: members %v, rev %s (was %s)", got.Members, got.Rev, chRev)
	}
}

// A channel asked for with a template is seeded by the server: the daemon
// writes one _replicator document, reads its state onto the channel
// document, and stops it when the channel is deleted. A template that
// cannot be read shows as a crashing seed with its reason; an unknown
// template is refused on the request.
func TestUserChannelSeededFromTemplateByTheServer(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	template := couchtest.NewDB(t, admin)
	ctx := context.Background()
	for i := range 3 {
		if _, err := template.Put(ctx, fmt.Sprintf("starter-%d", i), map[string]any{"title": "welcome"}); err != nil {
			t.Fatal(err)
		}
	}
	alice := "alice-" + control.Name() + "@example.com"
	aDB := admin.DB(devices.UserDBName(alice))
	if err := admin.CreateDB(ctx, aDB.Name()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.DestroyDB(context.Background(), aDB.Name()) })
	o := couchtest.Options(t)
	var seeds []string
	var mu sync.Mutex
	ch, err := channels.New(channels.Options{Client: admin, DB: control, Prefix: prefixFor(control),
		ReconcileInterval: time.Minute, Logger: workflowtest.Logger(t),
		Templates:  map[string]string{"starter": template.Name(), "gone": "tmpl-missing-" + control.Name()},
		Replicator: channels.Replicator{URL: o.URL, Username: o.Username, Password: o.Password},
		OnSeed: func(state string) {
			mu.Lock()
			seeds = append(seeds, state)
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	reg := workflow.NewRegistry()
	if err := ch.RegisterUserDBs(reg); err != nil {
		t.Fatal(err)
	}
	workflowtest.Start(t, aDB, reg, workflowtest.Options(t))
	put := func(id string, fields map[string]any) {
		t.Helper()
		doc := map[string]any{"type": channels.RequestType, "state": "new"}
		for k, v := range fields {
			doc[k] = v
		}
		if _, err := aDB.Put(ctx, id, doc); err != nil {
			t.Fatal(err)
		}
	}
	put("channel_request:1", map[string]any{"action": "create", "channel": "home", "name": "Home", "template": "starter"})
	put("channel_request:2", map[string]any{"action": "create", "channel": "broken", "name": "Broken", "template": "gone"})
	put("channel_request:3", map[string]any{"action": "create", "channel": "other", "name": "Other", "template": "nosuch"})
	if r := waitState(t, aDB, "channel_request:3", channels.StateRefused); r.ID == "" {
		t.Fatal("no refusal")
	}

	type seeded struct {
		Database string `json:"database"`
		Seed     struct {
			State  string `json:"state"`
			Reason string `json:"reason"`
		} `json:"seed"`
	}
	waitSeed := func(id string, states ...string) seeded {
		t.Helper()
		var s seeded
		workflowtest.Eventually(t, 60*time.Second, id+" seed "+fmt.Sprint(states), func() (bool, string) {
			if err := aDB.Get(ctx, id).ScanDoc(&s); err != nil {
				return false, err.Error()
			}
			return slices.Contains(states, s.Seed.State), fmt.Sprintf("%+v", s.Seed)
		})
		return s
	}
	home := waitSeed("channel:home", channels.SeedCompleted)
	for i := range 3 {
		if _, err := admin.DB(home.Database).Get(ctx, fmt.Sprintf("starter-%d", i)).Rev(); err != nil {
			t.Errorf("starter-%d not seeded into %s: %v", i, home.Database, err)
		}
	}
	if _, err := admin.DB("_replicator").Get(ctx, channels.SeedIDPrefix+home.Database).Rev(); err != nil {
		t.Errorf("the seed's _replicator document: %v", err)
	}
	broken := waitSeed("channel:broken", channels.SeedFailed)
	if !strings.Contains(broken.Seed.Reason, "does not exist") {
		t.Errorf("a failed seed's reason: %+v", broken.Seed)
	}
	if ok, _ := admin.DBExists(ctx, "tmpl-missing-"+control.Name()); ok {
		t.Error("the missing template was created")
	}

	// A replication the server cannot run is not tried here: PouchDB
	// Server 4.2.0's replicator takes the whole server process down when a
	// replication fails on authentication. The crashing state is read from
	// CouchDB's scheduler (TestSeedStateFromTheScheduler).
	mu.Lock()
	if !slices.Contains(seeds, channels.SeedCompleted) {
		t.Errorf("seed states counted %v", seeds)
	}
	mu.Unlock()

	// Deleting the channel stops its replication.
	put("channel_request:4", map[string]any{"action": "delete", "channel": "broken"})
	waitState(t, aDB, "channel:broken", channels.StateDeleted)
	if _, err := admin.DB("_replicator").Get(ctx, channels.SeedIDPrefix+broken.Database).Rev(); err == nil {
		t.Error("a deleted channel's seed replication is still there")
	}
}
