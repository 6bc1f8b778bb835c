package channels_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
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

func TestMain(m *testing.M) { couchtest.Main(m) }

// device is an active device as the devices set leaves it: a _users entry
// with the owner's role, and an active device document in the control db.
type device struct {
	docID, user, password, owner string
}

// addDevice creates an active device of owner: its CouchDB user (with a
// random password, as a device picks one) and its device document.
func addDevice(t testing.TB, admin *kivik.Client, control *kivik.DB, owner string) device {
	t.Helper()
	var b [12]byte
	_, _ = rand.Read(b[:])
	d := device{docID: "dev-" + hex.EncodeToString(b[:6]), user: "device-" + hex.EncodeToString(b[6:]), password: hex.EncodeToString(b[:]), owner: owner}
	ctx := context.Background()
	if _, err := admin.DB("_users").Put(ctx, "org.couchdb.user:"+d.user, map[string]any{
		"name": d.user, "type": "user", "roles": []string{devices.OwnerRole(owner)}, "password": d.password,
	}); err != nil {
		t.Fatalf("create user: %v", err)
	}
	t.Cleanup(func() {
		var u struct {
			Rev string `json:"_rev"`
		}
		if admin.DB("_users").Get(context.Background(), "org.couchdb.user:"+d.user).ScanDoc(&u) == nil {
			_, _ = admin.DB("_users").Delete(context.Background(), "org.couchdb.user:"+d.user, u.Rev)
		}
	})
	if _, err := control.Put(ctx, d.docID, map[string]any{
		"type": devices.DocType, "state": devices.StateActive, "owner": owner,
		devices.FieldOwnerRole: devices.OwnerRole(owner), devices.FieldCouchUser: d.user,
	}); err != nil {
		t.Fatalf("device doc: %v", err)
	}
	return d
}

// client logs in as the device.
func (d device) client(t testing.TB) *kivik.Client {
	t.Helper()
	opts := couchtest.Options(t)
	opts.Username, opts.Password = d.user, d.password
	c, err := couch.NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// start runs an engine with the channel handlers on control.
func start(t testing.TB, admin *kivik.Client, control *kivik.DB, opts channels.Options) *workflowtest.Running {
	t.Helper()
	opts.Client, opts.DB = admin, control
	if opts.Prefix == "" {
		opts.Prefix = prefixFor(control)
	}
	opts.Logger = workflowtest.Logger(t)
	ch, err := channels.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	reg := workflow.NewRegistry()
	if err := ch.Register(reg); err != nil {
		t.Fatal(err)
	}
	return workflowtest.Start(t, control, reg, workflowtest.Options(t))
}

// prefixFor is the channel database prefix of a test's control database.
func prefixFor(control *kivik.DB) string {
	sum := sha256.Sum256([]byte(control.Name()))
	return "tch-" + hex.EncodeToString(sum[:4]) + "-"
}

// chanDoc is a channel document as read back.
type chanDoc struct {
	ID            string         `json:"_id"`
	Rev           string         `json:"_rev"`
	State         string         `json:"state"`
	Database      string         `json:"database"`
	MemberRoles   []string       `json:"member_roles"`
	Subscriptions int            `json:"subscriptions"`
	Meta          *workflow.Meta `json:"docstate"`
}

func getChannel(t testing.TB, db *kivik.DB, id string) chanDoc {
	t.Helper()
	var c chanDoc
	if err := db.Get(context.Background(), id).ScanDoc(&c); err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return c
}

// waitState waits until the channel document is in state.
func waitState(t testing.TB, db *kivik.DB, id, state string) chanDoc {
	t.Helper()
	var c chanDoc
	workflowtest.Eventually(t, 60*time.Second, id+" "+state, func() (bool, string) {
		c = getChannel(t, db, id)
		return c.State == state, fmt.Sprintf("state %q meta %+v", c.State, c.Meta)
	})
	return c
}

// update changes a channel document's fields, retrying on conflicts with
// the engine's own writes.
func update(t testing.TB, db *kivik.DB, id string, change func(doc map[string]any)) {
	t.Helper()
	for range 20 {
		var doc map[string]any
		if err := db.Get(context.Background(), id).ScanDoc(&doc); err != nil {
			t.Fatal(err)
		}
		change(doc)
		_, err := db.Put(context.Background(), id, doc)
		if err == nil {
			return
		}
		if !couch.IsConflict(err) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("update %s kept conflicting", id)
}

// subscriptions lists the subscription documents of a channel.
func subscriptions(t testing.TB, db *kivik.DB, channelID string) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{}
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	for rows.Next() {
		var d map[string]any
		if err := rows.ScanDoc(&d); err != nil {
			t.Fatal(err)
		}
		if d["type"] == channels.SubscriptionType && (channelID == "" || d["channel"] == channelID) {
			out[d["_id"].(string)] = d
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
