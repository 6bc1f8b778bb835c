package devicetest_test

import (
	"context"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/devicetest"
)

func TestMain(m *testing.M) { couchtest.Main(m) }

// A device signs itself up as a CouchDB user, replicates both ways with a
// database secured to it, keeps writing while offline, and catches up in
// both directions when it comes back; a stranger is refused.
func TestDeviceReplicatesThroughOutages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin := couchtest.Client(t)
	db := couchtest.NewDB(t, admin)
	server := couchtest.Options(t).URL
	if err := db.SetSecurity(ctx, securityFor("dev-alice")); err != nil {
		t.Fatal(err)
	}

	dev := devicetest.Start(t)
	res, err := dev.SignUp(ctx, server, "dev-alice", "s3cret-alice", nil)
	if err != nil || res.Status != 201 {
		t.Fatalf("sign up: %v %d %s", err, res.Status, res.Body)
	}
	t.Cleanup(func() { deleteUser(t, "dev-alice") })
	remote := devicetest.Remote{URL: server + "/" + db.Name(), User: "dev-alice", Password: "s3cret-alice"}

	if _, err := dev.Put(ctx, "local", map[string]any{"_id": "note-1", "text": "hello"}); err != nil {
		t.Fatal(err)
	}
	if err := dev.Replicate(ctx, "local", remote, "push"); err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := db.Get(ctx, "note-1").ScanDoc(&got); err != nil || got["text"] != "hello" {
		t.Fatalf("server copy after push: %v %v", got, err)
	}

	handle, err := dev.Live(ctx, "local", remote, "sync")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Put(ctx, "from-server", map[string]any{"n": 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.WaitFor(ctx, "local", "from-server", map[string]any{"n": 1}, 20*time.Second); err != nil {
		t.Fatal(err)
	}

	// Offline: writes on both sides wait, then cross when it is back.
	if err := dev.Offline(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.Put(ctx, "local", map[string]any{"_id": "written-offline", "n": 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Put(ctx, "server-while-offline", map[string]any{"n": 3}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if err := db.Get(ctx, "written-offline").Err(); err == nil {
		t.Fatal("an offline device's write reached the server")
	}
	if err := dev.Online(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := dev.WaitFor(ctx, "local", "server-while-offline", map[string]any{"n": 3}, 30*time.Second); err != nil {
		st, _ := dev.Status(ctx, handle)
		t.Fatalf("%v (replication %+v)", err, st)
	}
	deadline := time.Now().Add(30 * time.Second)
	for db.Get(ctx, "written-offline").Err() != nil {
		if time.Now().After(deadline) {
			st, _ := dev.Status(ctx, handle)
			t.Fatalf("the offline write never reached the server (replication %+v)", st)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A stranger, with no account and with a wrong password, is refused.
	stranger := devicetest.Start(t)
	for _, r := range []devicetest.Remote{{URL: remote.URL}, {URL: remote.URL, User: "dev-alice", Password: "wrong"}} {
		err := stranger.Replicate(ctx, "loot", r, "pull")
		if err == nil {
			t.Fatalf("stranger %q pulled a secured database", r.User)
		}
	}
	if _, err := stranger.Get(ctx, "loot", "note-1"); !devicetest.IsNotFound(err) {
		t.Fatalf("stranger's copy: %v, want not found", err)
	}
}

func securityFor(name string) *kivik.Security {
	return &kivik.Security{Members: kivik.Members{Names: []string{name}}}
}

// deleteUser removes a _users document the test created: the server is
// shared by the package's tests.
func deleteUser(t *testing.T, name string) {
	ctx := context.Background()
	users := couchtest.Client(t).DB("_users")
	id := "org.couchdb.user:" + name
	var doc struct {
		Rev string `json:"_rev"`
	}
	if err := users.Get(ctx, id).ScanDoc(&doc); err != nil {
		t.Errorf("read user %s: %v", name, err)
		return
	}
	if _, err := users.Delete(ctx, id, doc.Rev); err != nil {
		t.Errorf("delete user %s: %v", name, err)
	}
}
