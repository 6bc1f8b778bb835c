package channels_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/channels"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// The whole life of a channel against the real server: provisioned and
// secured, used by members' devices and refused to others, replicated by a
// device from its subscription, a member removed, and the channel deleted.
func TestChannelLifeSecurityAndReplication(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	const alice, bob, eve = "alice@example.com", "bob@example.com", "eve@example.com"
	phone := addDevice(t, admin, control, alice)
	laptop := addDevice(t, admin, control, alice)
	bobPhone := addDevice(t, admin, control, bob)
	evil := addDevice(t, admin, control, eve)

	var provisioned atomic.Int64
	start(t, admin, control, channels.Options{
		PublicURL: couchtest.Options(t).URL, ReconcileInterval: time.Second,
		OnProvisioned: func() { provisioned.Add(1) },
	})
	if _, err := control.Put(ctx, "family", map[string]any{
		"type": "channel", "state": "new", "owner": alice, "name": "Family Photos ✨ / 2026!",
		"members": []string{"BOB@example.com", alice},
	}); err != nil {
		t.Fatal(err)
	}
	ch := waitState(t, control, "family", channels.StateReady)
	if !strings.HasPrefix(ch.Database, "tch-") || !strings.Contains(ch.Database, "family-photos-2026-") {
		t.Fatalf("database name %q", ch.Database)
	}
	wantRoles := []string{devices.OwnerRole(alice), devices.OwnerRole(bob)}
	slices.Sort(wantRoles)
	sec, err := admin.DB(ch.Database).Security(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sec.Members.Roles, wantRoles) || len(sec.Members.Names) != 0 || len(sec.Admins.Names)+len(sec.Admins.Roles) != 0 {
		t.Fatalf("_security %+v, want member roles %v only", sec, wantRoles)
	}
	if provisioned.Load() < 1 {
		t.Fatal("OnProvisioned not called")
	}

	// Every active device of every member gets a subscription; eve's not.
	workflowtest.Eventually(t, 30*time.Second, "3 subscriptions", func() (bool, string) {
		subs := subscriptions(t, control, "family")
		return len(subs) == 3, fmt.Sprint(len(subs), " subscriptions")
	})
	subs := subscriptions(t, control, "family")
	for _, d := range []device{phone, laptop, bobPhone} {
		s, ok := subs[channels.SubscriptionID("family", d.docID)]
		if !ok || s["database"] != ch.Database || s["couch_user"] != d.user || !strings.HasSuffix(s["url"].(string), "/"+ch.Database) {
			t.Fatalf("subscription of %s: %v", d.docID, s)
		}
	}

	// Members' devices read and write; a non-member is refused both.
	db := phone.client(t).DB(ch.Database)
	if _, err := db.Put(ctx, "photo-1", map[string]any{"caption": "from alice's phone"}); err != nil {
		t.Fatalf("member write: %v", err)
	}
	var got map[string]any
	if err := bobPhone.client(t).DB(ch.Database).Get(ctx, "photo-1").ScanDoc(&got); err != nil {
		t.Fatalf("member read: %v", err)
	}
	refused := func(who device) {
		t.Helper()
		edb := who.client(t).DB(ch.Database)
		if err := edb.Get(ctx, "photo-1").ScanDoc(&got); !couch.IsUnauthorized(err) {
			t.Fatalf("%s read: %v, want 401/403", who.owner, err)
		}
		if _, err := edb.Put(ctx, "intruder-"+who.user, map[string]any{"x": 1}); !couch.IsUnauthorized(err) {
			t.Fatalf("%s write: %v, want 401/403", who.owner, err)
		}
	}
	refused(evil)

	// The laptop follows its subscription: it replicates the channel, with
	// its own credentials, into its local database (here on the same
	// server), and alice's phone's photo arrives there.
	local := couchtest.NewDB(t, admin)
	sub := subs[channels.SubscriptionID("family", laptop.docID)]
	src, _ := url.Parse(sub["url"].(string))
	src.User = url.UserPassword(laptop.user, laptop.password)
	tgt, _ := url.Parse(couchtest.Options(t).URL + "/" + local.Name())
	tgt.User = url.UserPassword(couchtest.Options(t).Username, couchtest.Options(t).Password)
	written := time.Now()
	if _, err := db.Put(ctx, "photo-2", map[string]any{"caption": "second"}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Replicate(ctx, tgt.String(), src.String()); err != nil {
		t.Fatalf("device replication: %v", err)
	}
	workflowtest.Eventually(t, 30*time.Second, "photo-2 on the laptop", func() (bool, string) {
		return local.Get(ctx, "photo-2").ScanDoc(&got) == nil, "not yet"
	})
	t.Logf("written through alice's phone, arrived in the laptop's database after %v", time.Since(written).Round(time.Millisecond))

	// Bob is removed: his role leaves _security, his subscription goes,
	// and his phone is refused.
	update(t, control, "family", func(doc map[string]any) { doc["members"] = []string{} })
	workflowtest.Eventually(t, 30*time.Second, "bob revoked", func() (bool, string) {
		sec, err := admin.DB(ch.Database).Security(ctx)
		if err != nil {
			return false, err.Error()
		}
		subs := subscriptions(t, control, "family")
		_, bobSub := subs[channels.SubscriptionID("family", bobPhone.docID)]
		return slices.Equal(sec.Members.Roles, []string{devices.OwnerRole(alice)}) && !bobSub && len(subs) == 2,
			fmt.Sprintf("roles %v, %d subscriptions", sec.Members.Roles, len(subs))
	})
	refused(bobPhone)

	// A device activated later gets the channel at the next reconcile.
	tablet := addDevice(t, admin, control, alice)
	workflowtest.Eventually(t, 30*time.Second, "tablet subscribed", func() (bool, string) {
		_, ok := subscriptions(t, control, "family")[channels.SubscriptionID("family", tablet.docID)]
		return ok, "no subscription yet"
	})

	// Deletion: subscriptions gone, then the database.
	update(t, control, "family", func(doc map[string]any) { doc["delete_requested"] = true })
	waitState(t, control, "family", channels.StateDeleted)
	if n := len(subscriptions(t, control, "family")); n != 0 {
		t.Fatalf("%d subscriptions left after deletion", n)
	}
	if exists, err := admin.DBExists(ctx, ch.Database); err != nil || exists {
		t.Fatalf("database %s still exists (%v) after deletion", ch.Database, err)
	}
	// The laptop's replication source is gone. (Not replicated again here:
	// PouchDB Server crashes replicating from a missing database.)
	if err := laptop.client(t).DB(ch.Database).Get(ctx, "photo-2").ScanDoc(&got); err == nil {
		t.Fatal("the deleted channel is still readable by a device")
	}
}

// With the archive policy a deleted channel's data stays, readable by
// server admins only: no member's device gets in any more.
func TestDeletedChannelArchivedIsAdminOnly(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	phone := addDevice(t, admin, control, "ann@example.com")
	start(t, admin, control, channels.Options{OnDelete: channels.ArchiveDatabase, ReconcileInterval: time.Second})
	if _, err := control.Put(ctx, "notes", map[string]any{"type": "channel", "state": "new", "owner": "ann@example.com", "name": "notes"}); err != nil {
		t.Fatal(err)
	}
	ch := waitState(t, control, "notes", channels.StateReady)
	if _, err := phone.client(t).DB(ch.Database).Put(ctx, "n1", map[string]any{"text": "keep me"}); err != nil {
		t.Fatal(err)
	}
	update(t, control, "notes", func(doc map[string]any) { doc["delete_requested"] = true })
	waitState(t, control, "notes", channels.StateDeleted)
	var n map[string]any
	if err := admin.DB(ch.Database).Get(ctx, "n1").ScanDoc(&n); err != nil {
		t.Fatalf("archived data not readable by the admin: %v", err)
	}
	if err := phone.client(t).DB(ch.Database).Get(ctx, "n1").ScanDoc(&n); !couch.IsUnauthorized(err) {
		t.Fatalf("owner's device read an archived channel: %v", err)
	}
}

// Bad channel documents go to the error state with a reason naming the
// problem; no database is created for them.
func TestHostileChannelDocumentsFailWithReason(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	many := make([]string, 101)
	for i := range many {
		many[i] = fmt.Sprintf("m%d@example.com", i)
	}
	cases := map[string]struct {
		doc  map[string]any
		want string
	}{
		"no-owner":       {map[string]any{"name": "x"}, "owner is missing"},
		"owner-number":   {map[string]any{"owner": 7, "name": "x"}, "owner must be a string"},
		"owner-crlf":     {map[string]any{"owner": "a@example.com\r\nBcc: x@evil.test", "name": "x"}, "owner contains a control"},
		"owner-display":  {map[string]any{"owner": "Al <a@example.com>", "name": "x"}, "owner contains a control, space"},
		"name-empty":     {map[string]any{"owner": "a@example.com", "name": ""}, "name is empty"},
		"name-long":      {map[string]any{"owner": "a@example.com", "name": strings.Repeat("n", 201)}, "more than 200"},
		"name-control":   {map[string]any{"owner": "a@example.com", "name": "a\x00b"}, "control character"},
		"name-object":    {map[string]any{"owner": "a@example.com", "name": map[string]any{"x": 1}}, "name must be a string"},
		"members-string": {map[string]any{"owner": "a@example.com", "name": "x", "members": "b@example.com"}, "members must be an array"},
		"member-number":  {map[string]any{"owner": "a@example.com", "name": "x", "members": []any{1}}, "members[0] must be a string"},
		"member-bad":     {map[string]any{"owner": "a@example.com", "name": "x", "members": []any{"not-an-address"}}, "members[0] is not an email"},
		"members-many":   {map[string]any{"owner": "a@example.com", "name": "x", "members": many}, "more than 100"},
		"delete-string":  {map[string]any{"owner": "a@example.com", "name": "x", "delete_requested": "yes"}, "delete_requested must be true or false"},
	}
	for id, c := range cases {
		doc := map[string]any{"type": "channel", "state": "new"}
		for k, v := range c.doc {
			doc[k] = v
		}
		if _, err := control.Put(ctx, id, doc); err != nil {
			t.Fatal(err)
		}
	}
	before, err := admin.AllDBs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start(t, admin, control, channels.Options{})
	for id, c := range cases {
		d := waitState(t, control, id, "error")
		if d.Meta == nil || d.Meta.Error == nil || !strings.Contains(d.Meta.Error.Reason, c.want) {
			t.Errorf("%s: reason %+v, want it to contain %q", id, d.Meta, c.want)
		}
	}
	after, err := admin.AllDBs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Fatalf("databases created for invalid channels: %v -> %v", before, after)
	}
}

// Two channel documents of one owner with the same name derive the same
// database: the second is refused with a clear reason and never touches
// the first one's _security.
func TestSameNameTwiceIsACollision(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	start(t, admin, control, channels.Options{})
	put := func(id string, members []string) {
		if _, err := control.Put(ctx, id, map[string]any{"type": "channel", "state": "new", "owner": "o@example.com", "name": "Trip", "members": members}); err != nil {
			t.Fatal(err)
		}
	}
	put("first", nil)
	first := waitState(t, control, "first", channels.StateReady)
	put("second", []string{"intruder@example.com"})
	second := waitState(t, control, "second", "error")
	if !strings.Contains(second.Meta.Error.Reason, `already belongs to channel document "first"`) {
		t.Fatalf("reason %q", second.Meta.Error.Reason)
	}
	sec, err := admin.DB(first.Database).Security(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sec.Members.Roles, []string{devices.OwnerRole("o@example.com")}) {
		t.Fatalf("the colliding channel changed _security: %v", sec.Members.Roles)
	}
}

// 100 channels × 3 devices, provisioned by two daemons at once, one of them
// stopped hard half way and started again: every database exists once with
// its description written once, every subscription is there exactly once.
func TestHundredChannelsTwoDaemonsAndARestart(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	const owners, perOwner, devicesPer = 20, 5, 3
	for o := range owners {
		for range devicesPer {
			addDevice(t, admin, control, fmt.Sprintf("owner%d@example.com", o))
		}
	}
	var docs []any
	for o := range owners {
		for c := range perOwner {
			docs = append(docs, map[string]any{"_id": fmt.Sprintf("ch-%02d-%d", o, c), "type": "channel", "state": "new",
				"owner": fmt.Sprintf("owner%d@example.com", o), "name": fmt.Sprintf("Channel %d", c)})
		}
	}
	if _, err := control.BulkDocs(ctx, docs); err != nil {
		t.Fatal(err)
	}
	opts := channels.Options{ReconcileInterval: time.Hour}
	a := start(t, admin, control, opts)
	start(t, admin, control, opts)
	// Stop daemon a hard while provisioning is under way, then restart it.
	workflowtest.Eventually(t, 60*time.Second, "some provisioned", func() (bool, string) {
		s := a.Stats()
		return s.Transitions >= 10, fmt.Sprint(s.Transitions, " transitions")
	})
	a.Stop(t)
	start(t, admin, control, opts)

	total := owners * perOwner
	workflowtest.Eventually(t, 120*time.Second, "all ready with subscriptions", func() (bool, string) {
		ready, subs := 0, 0
		rows := control.AllDocs(ctx, kivik.Param("include_docs", true))
		defer rows.Close()
		for rows.Next() {
			var d chanDoc
			_ = rows.ScanDoc(&d)
			if d.State == channels.StateReady && d.Subscriptions == devicesPer {
				ready++
			}
		}
		subs = len(subscriptions(t, control, ""))
		return ready == total && subs == total*devicesPer, fmt.Sprintf("%d of %d ready, %d subscriptions", ready, total, subs)
	})
	all, err := admin.AllDBs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var dbs int
	for _, name := range all {
		if !strings.HasPrefix(name, prefixFor(control)) {
			continue
		}
		dbs++
		var info struct {
			Rev string `json:"_rev"`
		}
		if err := admin.DB(name).Get(ctx, channels.InfoDocID).ScanDoc(&info); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !strings.HasPrefix(info.Rev, "1-") {
			t.Errorf("%s: description written more than once (%s)", name, info.Rev)
		}
	}
	if dbs != total {
		t.Fatalf("%d channel databases, want %d", dbs, total)
	}
	t.Logf("%d channels × %d devices by 2 daemons (one restarted): %d databases, %d subscriptions", total, devicesPer, dbs, len(subscriptions(t, control, "")))
}

// A daemon that died after creating, claiming and securing a channel's
// database but before recording it (the document still says new, without
// database) left a database only the derived name leads to. Deleting the
// channel then removes it (or archives it) when its description document
// names this channel document, and never touches a database that another
// channel document claimed or that nobody claimed.
func TestDeleteAfterCrashBeforeReadyRemovesDerivedDatabase(t *testing.T) {
	for _, policy := range []string{channels.DeleteDatabase, channels.ArchiveDatabase} {
		t.Run(policy, func(t *testing.T) {
			admin := couchtest.Client(t)
			control := couchtest.NewDB(t, admin)
			ctx := context.Background()
			prefix := prefixFor(control)
			// halfDone creates the database a channel of owner and name
			// derives, with a description document claiming it for
			// claimedBy ("": none), and the channel document id in state new
			// with delete_requested, as a crash before ready and a later
			// delete request leave it.
			halfDone := func(id, owner, name, claimedBy string) string {
				t.Helper()
				db := channels.DBName(prefix, owner, name)
				if err := admin.CreateDB(ctx, db); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = admin.DestroyDB(context.Background(), db) })
				if claimedBy != "" {
					if _, err := admin.DB(db).Put(ctx, channels.InfoDocID, map[string]any{
						"type": channels.InfoType, "channel_doc": claimedBy, "name": name, "owner_role": devices.OwnerRole(owner),
					}); err != nil {
						t.Fatal(err)
					}
				}
				if err := admin.DB(db).SetSecurity(ctx, &kivik.Security{Members: kivik.Members{Roles: []string{devices.OwnerRole(owner)}}}); err != nil {
					t.Fatal(err)
				}
				if _, err := control.Put(ctx, id, map[string]any{"type": "channel", "state": "new", "owner": owner,
					"name": name, "delete_requested": true}); err != nil {
					t.Fatal(err)
				}
				return db
			}
			own := halfDone("own", "o@example.com", "Half done", "own")
			foreign := halfDone("intruder", "o@example.com", "Taken", "rightful-owner")
			unclaimed := halfDone("unclaimed", "o@example.com", "Nobody's", "")
			// Deleted before the crashed daemon had created anything.
			if _, err := control.Put(ctx, "early", map[string]any{"type": "channel", "state": "new", "owner": "o@example.com",
				"name": "Early", "delete_requested": true}); err != nil {
				t.Fatal(err)
			}

			start(t, admin, control, channels.Options{OnDelete: policy})
			for _, id := range []string{"own", "intruder", "unclaimed", "early"} {
				waitState(t, control, id, channels.StateDeleted)
			}
			exists, err := admin.DBExists(ctx, own)
			if err != nil {
				t.Fatal(err)
			}
			switch policy {
			case channels.DeleteDatabase:
				if exists {
					t.Errorf("database %s of the half-provisioned channel still exists after deletion", own)
				}
			case channels.ArchiveDatabase:
				sec, err := admin.DB(own).Security(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if !exists || !slices.Equal(sec.Members.Roles, []string{"_admin"}) {
					t.Errorf("database %s not archived: exists %v, member roles %v", own, exists, sec.Members.Roles)
				}
			}
			if d := getChannel(t, control, "own"); d.Database != own {
				t.Errorf("deleted channel records database %q, want %q", d.Database, own)
			}
			early := channels.DBName(prefix, "o@example.com", "Early")
			if exists, err := admin.DBExists(ctx, early); err != nil || exists {
				t.Errorf("deleting a channel that never had a database created %s (%v)", early, err)
			}
			for _, db := range []string{foreign, unclaimed} {
				sec, err := admin.DB(db).Security(ctx)
				if err != nil {
					t.Fatalf("database %s not claimed by the deleted channel is gone: %v", db, err)
				}
				if !slices.Equal(sec.Members.Roles, []string{devices.OwnerRole("o@example.com")}) {
					t.Errorf("database %s not claimed by the deleted channel was archived: %v", db, sec.Members.Roles)
				}
			}
		})
	}
}

// A ready reconcile on one daemon that read its channel before another
// daemon deleted it writes subscriptions after that deletion swept them: it
// must take them back, so that no subscription outlives a completed
// deletion. The hook runs daemon b's whole deletion in the window between
// daemon a's reads and its write.
func TestReconcileRacingDeletionLeavesNoSubscription(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	const owner = "r@example.com"
	prefix := prefixFor(control)
	daemon := func() *channels.Channels {
		t.Helper()
		c, err := channels.New(channels.Options{Client: admin, DB: control, Prefix: prefix, Logger: workflowtest.Logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := daemon(), daemon()
	database := channels.DBName(prefix, owner, "Race")
	if err := admin.CreateDB(ctx, database); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.DestroyDB(context.Background(), database) })
	if _, err := control.Put(ctx, "race", map[string]any{"type": "channel", "state": channels.StateReady,
		"owner": owner, "name": "Race", "database": database}); err != nil {
		t.Fatal(err)
	}
	// read is the channel document as the engine hands it to a handler.
	read := func() *workflow.Doc {
		t.Helper()
		var raw json.RawMessage
		if err := control.Get(ctx, "race").ScanDoc(&raw); err != nil {
			t.Fatal(err)
		}
		doc, err := workflow.NewDoc(raw)
		if err != nil {
			t.Fatal(err)
		}
		return doc
	}

	// Undisturbed, the reconcile's subscriptions stay.
	phone := addDevice(t, admin, control, owner)
	if _, err := a.HandleReady(ctx, read()); err != nil {
		t.Fatal(err)
	}
	if _, ok := subscriptions(t, control, "race")[channels.SubscriptionID("race", phone.docID)]; !ok {
		t.Fatal("the ready channel's subscription was not written or was taken back")
	}

	// A device activated later gives daemon a's next reconcile something
	// to write; daemon b deletes the channel just before that write.
	tablet := addDevice(t, admin, control, owner)
	stale := read()
	raced := false
	a.SetBeforeSubscriptionWrites(func() {
		if raced {
			return
		}
		raced = true
		update(t, control, "race", func(doc map[string]any) {
			doc["delete_requested"], doc["state"] = true, channels.StateDeleting
		})
		if _, err := b.HandleDeleting(ctx, read()); err != nil {
			t.Fatal(err)
		}
		update(t, control, "race", func(doc map[string]any) { doc["state"] = channels.StateDeleted })
		if n := len(subscriptions(t, control, "race")); n != 0 {
			t.Fatalf("deletion left %d subscriptions", n)
		}
	})
	if _, err := a.HandleReady(ctx, stale); err != nil {
		t.Fatal(err)
	}
	if !raced {
		t.Fatal("the reconcile had nothing to write: the race was not driven")
	}
	if subs := subscriptions(t, control, "race"); len(subs) != 0 {
		t.Fatalf("%d subscriptions outlive the completed deletion (tablet's: %v)", len(subs),
			subs[channels.SubscriptionID("race", tablet.docID)] != nil)
	}
}

// An archived channel's database keeps its description document, so its
// name stays taken: a new channel of the same owner and name is a
// collision, and the archive stays admin-only.
func TestArchivedNameStaysTaken(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	start(t, admin, control, channels.Options{OnDelete: channels.ArchiveDatabase})
	put := func(id string) {
		t.Helper()
		if _, err := control.Put(ctx, id, map[string]any{"type": "channel", "state": "new", "owner": "o@example.com", "name": "Trip"}); err != nil {
			t.Fatal(err)
		}
	}
	put("old")
	old := waitState(t, control, "old", channels.StateReady)
	update(t, control, "old", func(doc map[string]any) { doc["delete_requested"] = true })
	waitState(t, control, "old", channels.StateDeleted)
	put("again")
	again := waitState(t, control, "again", "error")
	if !strings.Contains(again.Meta.Error.Reason, `already belongs to channel document "old"`) {
		t.Fatalf("reason %q", again.Meta.Error.Reason)
	}
	sec, err := admin.DB(old.Database).Security(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sec.Members.Roles, []string{"_admin"}) {
		t.Fatalf("the colliding channel changed the archive's _security: %v", sec.Members.Roles)
	}
}

// An idle ready channel reconciles every ReconcileInterval without writing:
// no revision of its document (which every device replicates) and none of
// its subscriptions while nothing changes; a device activated meanwhile
// still gets its subscription within the interval.
func TestIdleReconcileWritesNoRevisions(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	const owner = "idle@example.com"
	addDevice(t, admin, control, owner)
	runs := start(t, admin, control, channels.Options{ReconcileInterval: time.Second})
	if _, err := control.Put(ctx, "quiet", map[string]any{"type": "channel", "state": "new", "owner": owner, "name": "Quiet"}); err != nil {
		t.Fatal(err)
	}
	waitState(t, control, "quiet", channels.StateReady)
	workflowtest.Eventually(t, 10*time.Second, "1 subscription", func() (bool, string) {
		return len(subscriptions(t, control, "quiet")) == 1, ""
	})
	time.Sleep(2 * time.Second) // the first reconciles settle
	revOf := func(id string) string {
		var d struct {
			Rev string `json:"_rev"`
		}
		if err := control.Get(ctx, id).ScanDoc(&d); err != nil {
			t.Fatal(err)
		}
		return d.Rev
	}
	before := revOf("quiet")
	seq := func() string {
		st, err := control.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.UpdateSeq
	}
	seqBefore := seq()
	ran := runs.Stats().Runs
	time.Sleep(5 * time.Second) // five intervals
	if after := revOf("quiet"); after != before {
		t.Fatalf("idle channel went from %s to %s in five reconcile intervals", before, after)
	}
	if s := seq(); s != seqBefore {
		t.Fatalf("the control database changed while idle: update_seq %s → %s", seqBefore, s)
	}
	if n := runs.Stats().Runs - ran; n < 3 {
		t.Fatalf("%d reconcile runs in five intervals, want them still running", n)
	}
	// Still event-free: a device activated later is found by the next run.
	addDevice(t, admin, control, owner)
	workflowtest.Eventually(t, 10*time.Second, "2 subscriptions", func() (bool, string) {
		return len(subscriptions(t, control, "quiet")) == 2, ""
	})
}

// With UserDBs, a device paired through its own user finds its
// subscription in its owner's control database, where it replicates from;
// removing the member or deleting the channel takes it back there, at once.
func TestSubscriptionsOfUserPairedDevicesLiveInTheirOwnersDatabase(t *testing.T) {
	admin := couchtest.Client(t)
	control := couchtest.NewDB(t, admin)
	ctx := context.Background()
	const alice, bob = "alice-ud@example.com", "bob-ud@example.com"
	addDevice(t, admin, control, alice) // paired through the control database
	bobPhone := addDevice(t, admin, control, bob)
	// bob's phone paired through its own user: its trusted document says so.
	var d map[string]any
	if err := control.Get(ctx, bobPhone.docID).ScanDoc(&d); err != nil {
		t.Fatal(err)
	}
	d[devices.FieldPairingMode] = devices.PairingUsers
	if _, err := control.Put(ctx, bobPhone.docID, d); err != nil {
		t.Fatal(err)
	}
	bobDB := devices.UserDBName(bob)
	if err := admin.CreateDB(ctx, bobDB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.DestroyDB(context.Background(), bobDB) })

	start(t, admin, control, channels.Options{UserDBs: true, ReconcileInterval: time.Second})
	if _, err := control.Put(ctx, "shared", map[string]any{"type": "channel", "state": "new", "owner": alice, "name": "Shared",
		"members": []string{bob}}); err != nil {
		t.Fatal(err)
	}
	waitState(t, control, "shared", channels.StateReady)
	sub := channels.SubscriptionID("shared", bobPhone.docID)
	workflowtest.Eventually(t, 15*time.Second, "bob's subscription in bob's database, alice's in control", func() (bool, string) {
		inBob, inControl := subscriptions(t, admin.DB(bobDB), "shared"), subscriptions(t, control, "shared")
		_, ok := inBob[sub]
		_, wrong := inControl[sub]
		return ok && !wrong && len(inControl) == 1, fmt.Sprint(len(inBob), " in bob's, ", len(inControl), " in control")
	})
	// bob is removed: his subscription goes from his own database. The
	// daemon writes the channel document too: redo on a conflict.
	workflowtest.Eventually(t, 10*time.Second, "bob removed", func() (bool, string) {
		var ch map[string]any
		if err := control.Get(ctx, "shared").ScanDoc(&ch); err != nil {
			return false, err.Error()
		}
		ch["members"] = []string{}
		_, err := control.Put(ctx, "shared", ch)
		return err == nil, fmt.Sprint(err)
	})
	workflowtest.Eventually(t, 15*time.Second, "bob's subscription taken back", func() (bool, string) {
		n := len(subscriptions(t, admin.DB(bobDB), "shared"))
		return n == 0, fmt.Sprint(n)
	})
}
