package channels_test

import (
	"context"
	"fmt"
	"slices"
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
