package cli_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/channels"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/devicetest"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// Real PouchDB devices, each paired through its own CouchDB user, ask for a
// channel by replication, offline first: alice's phone writes the request
// while offline and pushes it later; the daemon provisions the channel and
// reports on the request and the channel document; alice's and bob's
// phones find the subscription in their own control databases and
// replicate the channel with their own credentials. Dave, invited before
// he has any device, gets the channel when his first device is activated
// (the reconcile interval is an hour: no interval brings it). Removing bob
// takes his subscription and his access at once; deleting the channel
// takes the database. Hostile requests never reach the server.
func TestDevicesAskForChannelsByReplication(t *testing.T) {
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	ctx := context.Background()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	tag := hex.EncodeToString(b)
	prefix := "tcr" + tag + "-"
	d := startPairingDaemon(t, db.Name(), "channels:\n  enabled: true\n  prefix: "+prefix+"\n  public_url: %[1]s\n  reconcile_interval: 1h\n"+
		"databases:\n  discovery_interval: 300ms\n")
	defer d.stop()
	server, mail, stderr := d.server, d.mail, d.stderr
	alice, bob, dave := "alice-"+tag+"@example.test", "bob-"+tag+"@example.test", "dave-"+tag+"@example.test"
	t.Cleanup(func() {
		for _, o := range []string{alice, bob, dave} {
			_ = admin.DestroyDB(context.Background(), devices.UserDBName(o))
		}
	})
	phone, aUser, aPass, aURL := pairThroughUser(t, server, mail, alice, "Alice's phone", stderr)
	bobPhone, bUser, bPass, bURL := pairThroughUser(t, server, mail, bob, "Bob's phone", stderr)
	aControl := devicetest.Remote{URL: aURL, User: aUser, Password: aPass}
	bControl := devicetest.Remote{URL: bURL, User: bUser, Password: bPass}

	// Offline, alice's phone asks for a channel with bob and dave, and
	// tries what a device may not: naming an owner or a database, a
	// foreign channel id, or writing the daemon's documents.
	if err := phone.Offline(ctx); err != nil {
		t.Fatal(err)
	}
	put := func(doc map[string]any) {
		t.Helper()
		if _, err := phone.Put(ctx, "control", doc); err != nil {
			t.Fatalf("local put %v: %v", doc["_id"], err)
		}
	}
	put(map[string]any{"_id": "channel_request:1", "type": channels.RequestType, "state": "new",
		"action": channels.ActionCreate, "channel": "photos", "name": "Family Photos", "members": []string{bob, dave}})
	hostile := map[string]map[string]any{
		"channel_request:owner":                {"type": channels.RequestType, "state": "new", "action": "create", "channel": "x", "name": "X", "owner": bob},
		"channel_request:db":                   {"type": channels.RequestType, "state": "new", "action": "create", "channel": "y", "name": "Y", "database": "userctl-0"},
		"channel_request:up":                   {"type": channels.RequestType, "state": "new", "action": "create", "channel": "../userctl", "name": "Z"},
		"channel:photos2":                      {"type": channels.DocType, "state": "ready", "owner_role": devices.OwnerRole(bob), "name": "forged"},
		"channel-subscription:" + prefix + "x": {"type": channels.SubscriptionType, "database": "_users"},
	}
	for id, doc := range hostile {
		doc["_id"] = id
		put(doc)
	}
	if err := phone.Online(ctx); err != nil {
		t.Fatal(err)
	}
	if err := phone.Replicate(ctx, "control", aControl, "push"); err != nil {
		t.Fatal(err)
	}
	for id := range hostile {
		if _, err := admin.DB(devices.UserDBName(alice)).Get(ctx, id).Rev(); err == nil {
			t.Errorf("hostile document %s reached alice's control database", id)
		}
	}

	// The outcome comes back by replication.
	if err := phone.Replicate(ctx, "control", aControl, "pull"); err != nil {
		t.Fatal(err)
	}
	pullUntil := func(dev *devicetest.Device, remote devicetest.Remote, id string, fields map[string]any) map[string]any {
		t.Helper()
		var doc map[string]any
		workflowtest.Eventually(t, 30*time.Second, id, func() (bool, string) {
			if err := dev.Replicate(ctx, "control", remote, "pull"); err != nil {
				return false, err.Error()
			}
			var err error
			doc, err = dev.Get(ctx, "control", id)
			if err != nil {
				return false, err.Error()
			}
			for k, v := range fields {
				if fmt.Sprint(doc[k]) != fmt.Sprint(v) {
					return false, fmt.Sprintf("%s=%v", k, doc[k])
				}
			}
			return true, ""
		})
		return doc
	}
	pullUntil(phone, aControl, "channel_request:1", map[string]any{"state": channels.StateApplied, "channel_doc": "channel:photos"})
	ch := pullUntil(phone, aControl, "channel:photos", map[string]any{"state": channels.StateReady, "name": "Family Photos"})
	database, _ := ch["database"].(string)
	if !strings.HasPrefix(database, prefix) || ch["url"] != server+"/"+database {
		t.Fatalf("channel document %v", ch)
	}
	subID := channels.UserSubscriptionPrefix + database
	sub := pullUntil(phone, aControl, subID, map[string]any{"database": database})
	if sub["url"] != server+"/"+database {
		t.Fatalf("alice's subscription %v", sub)
	}

	// Alice's phone writes into the channel; bob's finds it in his own
	// control database and reads it with his own credentials.
	aChan := devicetest.Remote{URL: server + "/" + database, User: aUser, Password: aPass}
	if _, err := phone.Put(ctx, "photos", map[string]any{"_id": "p1", "title": "beach"}); err != nil {
		t.Fatal(err)
	}
	if err := phone.Replicate(ctx, "photos", aChan, "push"); err != nil {
		t.Fatal(err)
	}
	pullUntil(bobPhone, bControl, subID, map[string]any{"database": database})
	bChan := devicetest.Remote{URL: server + "/" + database, User: bUser, Password: bPass}
	if err := bobPhone.Replicate(ctx, "photos", bChan, "pull"); err != nil {
		t.Fatal(err)
	}
	if d, err := bobPhone.Get(ctx, "photos", "p1"); err != nil || d["title"] != "beach" {
		t.Fatalf("bob's copy of p1: %v %v", d, err)
	}

	// Dave was invited before he had a device: his first one finds the
	// channel in his control database right after activation.
	davePhone, dUser, dPass, dURL := pairThroughUser(t, server, mail, dave, "Dave's phone", stderr)
	pullUntil(davePhone, devicetest.Remote{URL: dURL, User: dUser, Password: dPass}, subID, map[string]any{"database": database})

	// Bob is removed: his subscription goes, and so does his access.
	if _, err := phone.Put(ctx, "control", map[string]any{"_id": "channel_request:2", "type": channels.RequestType, "state": "new",
		"action": channels.ActionRemoveMembers, "channel": "photos", "members": []string{bob}}); err != nil {
		t.Fatal(err)
	}
	if err := phone.Replicate(ctx, "control", aControl, "push"); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 30*time.Second, "bob's subscription and access gone", func() (bool, string) {
		_, err := admin.DB(devices.UserDBName(bob)).Get(ctx, subID).Rev()
		r, herr := bobPhone.HTTP(ctx, "GET", server+"/"+database+"/p1", bUser, bPass, nil)
		if herr != nil {
			return false, herr.Error()
		}
		return err != nil && (r.Status == 401 || r.Status == 403), fmt.Sprintf("subscription err %v, bob reads p1: %d", err, r.Status)
	})
	pullUntil(phone, aControl, "channel_request:2", map[string]any{"state": channels.StateApplied})

	// A request the daemon must refuse although the validation function
	// lets it through (the channel does not exist) is answered on itself.
	if _, err := phone.Put(ctx, "control", map[string]any{"_id": "channel_request:3", "type": channels.RequestType, "state": "new",
		"action": channels.ActionRename, "channel": "nosuch", "name": "Nope"}); err != nil {
		t.Fatal(err)
	}
	// And deleting the channel takes its database and every subscription.
	if _, err := phone.Put(ctx, "control", map[string]any{"_id": "channel_request:4", "type": channels.RequestType, "state": "new",
		"action": channels.ActionDelete, "channel": "photos"}); err != nil {
		t.Fatal(err)
	}
	if err := phone.Replicate(ctx, "control", aControl, "push"); err != nil {
		t.Fatal(err)
	}
	if r := pullUntil(phone, aControl, "channel_request:3", map[string]any{"state": channels.StateRefused}); !strings.Contains(fmt.Sprint(r["reason"]), "no channel nosuch") {
		t.Errorf("refusal reason %v", r["reason"])
	}
	pullUntil(phone, aControl, "channel:photos", map[string]any{"state": channels.StateDeleted})
	workflowtest.Eventually(t, 20*time.Second, "database and subscriptions gone", func() (bool, string) {
		exists, err := admin.DBExists(ctx, database)
		_, aErr := admin.DB(devices.UserDBName(alice)).Get(ctx, subID).Rev()
		_, dErr := admin.DB(devices.UserDBName(dave)).Get(ctx, subID).Rev()
		return err == nil && !exists && aErr != nil && dErr != nil, fmt.Sprint("exists ", exists, " alice's ", aErr, " dave's ", dErr)
	})
}
