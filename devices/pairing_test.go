package devices

import (
	"context"
	"encoding/json"
	"fmt"
	"net/mail"
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/devicetest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// usersStack runs the users pairing mode: the control database's engine
// and the followers of _users and the per-owner databases.
type usersStack struct {
	fixture
	mock    *mailtest.Mock
	server  string
	follow  *Followers
	stopped chan error
}

func startUsersStack(t *testing.T, mod func(*Options)) *usersStack {
	t.Helper()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	return startUsersStackWith(t, mock, mockMailer(t, mock), mod)
}

// startUsersStackWith is startUsersStack sending through mailer, which
// delivers to mock.
func startUsersStackWith(t testing.TB, mock *mailtest.Mock, mailer Mailer, mod func(*Options)) *usersStack {
	t.Helper()
	return startUsersStackOn(t, mock, mailer, stackOptions{devices: mod})
}

// stackOptions change what startUsersStackOn runs: through which client,
// and with which engine and follower options (the tests' fast intervals
// unless changed).
type stackOptions struct {
	client    *kivik.Client // nil: couchtest.Client
	devices   func(*Options)
	engine    func(*workflow.Options)
	followers func(*FollowerOptions)
}

func startUsersStackOn(t testing.TB, mock *mailtest.Mock, mailer Mailer, so stackOptions) *usersStack {
	t.Helper()
	server := couchtest.Options(t).URL
	client := so.client
	if client == nil {
		client = couchtest.Client(t)
	}
	f := newFixtureOn(t, client, mailer, func(o *Options) {
		o.Pairing = PairingUsers
		o.PublicURL = server
		if so.devices != nil {
			so.devices(o)
		}
	})
	if _, err := f.devs.ProvisionControl(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.start(t, so.engine)
	eo := workflowtest.Options(t)
	eo.Logger = f.devs.log
	if so.engine != nil {
		so.engine(&eo)
	}
	fo := FollowerOptions{Engine: eo,
		Supervisor:   supervisor.Options{DiscoveryInterval: 300 * time.Millisecond, IdleStop: 2 * time.Second},
		HealInterval: 500 * time.Millisecond}
	if so.followers != nil {
		so.followers(&fo)
	}
	fl, err := f.devs.NewFollowers(fo)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &usersStack{fixture: f, mock: mock, server: server, follow: fl, stopped: make(chan error, 1)}
	go func() { s.stopped <- fl.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-s.stopped; err != nil {
			t.Errorf("followers: %v", err)
		}
	})
	return s
}

// mailTo waits for the nth mail to owner. _users is shared by the
// package's tests, so a stack's start scan also mails earlier tests' devices.
func (s *usersStack) mailTo(t *testing.T, owner string, nth int) *mail.Message {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var to []*mail.Message
		for _, m := range s.mock.Received(t) {
			if strings.Contains(m.Header.Get("To"), owner) {
				to = append(to, m)
			}
		}
		if len(to) >= nth {
			return to[nth-1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d mails to %s, want %d", len(to), owner, nth)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pairedDevice is a real PouchDB device with its own CouchDB user.
type pairedDevice struct {
	*devicetest.Device
	user, password, owner string
}

func (s *usersStack) signUp(t *testing.T, owner, name string) pairedDevice {
	t.Helper()
	ctx := context.Background()
	dv := pairedDevice{Device: devicetest.Start(t), user: "dev-" + randomHex(t, 8), password: randomHex(t, 16), owner: owner}
	res, err := dv.SignUp(ctx, s.server, dv.user, dv.password, map[string]any{
		"state": UserState, FieldPairing: map[string]any{"owner": owner, "device_name": name},
	})
	if err != nil || res.Status != 201 {
		t.Fatalf("sign up %s: %v %d %s", dv.user, err, res.Status, res.Body)
	}
	return dv
}

// self reads the device's own user document as the device.
func (s *usersStack) self(t *testing.T, dv pairedDevice) map[string]any {
	t.Helper()
	res, err := dv.HTTP(context.Background(), "GET", s.server+"/_users/org.couchdb.user:"+dv.user, dv.user, dv.password, nil)
	if err != nil || res.Status != 200 {
		t.Fatalf("read own user doc: %v %d %s", err, res.Status, res.Body)
	}
	var doc map[string]any
	if err := json.Unmarshal(res.Body, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

func (s *usersStack) waitStatus(t *testing.T, dv pairedDevice, cond func(st map[string]any) bool, what string) map[string]any {
	t.Helper()
	var st map[string]any
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		st, _ = s.self(t, dv)[FieldPairingStatus].(map[string]any)
		if st != nil && cond(st) {
			return st
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: pairing_status %v", what, st)
	return nil
}

// request writes fields into the device's own pairing request, as the
// device, redoing on 409 (the daemon writes the status meanwhile).
func (s *usersStack) request(t *testing.T, dv pairedDevice, fields map[string]any) {
	t.Helper()
	for range 20 {
		doc := s.self(t, dv)
		p, _ := doc[FieldPairing].(map[string]any)
		for k, v := range fields {
			p[k] = v
		}
		doc[FieldPairing] = p
		doc["password"] = dv.password // _users keeps the hash; a PUT without it keeps it too on CouchDB, not on every server
		res, err := dv.HTTP(context.Background(), "PUT", s.server+"/_users/org.couchdb.user:"+dv.user, dv.user, dv.password, doc)
		if err != nil {
			t.Fatal(err)
		}
		if res.Status == 201 || res.Status == 200 {
			return
		}
		if res.Status != 409 {
			t.Fatalf("write own pairing request: %d %s", res.Status, res.Body)
		}
	}
	t.Fatal("write own pairing request: kept conflicting")
}

func (s *usersStack) pair(t *testing.T, owner, name string, mails int) pairedDevice {
	t.Helper()
	dv := s.signUp(t, owner, name)
	code := codeIn(t, readBody(t, s.mailTo(t, owner, mails)))
	s.waitStatus(t, dv, func(st map[string]any) bool { return st["state"] == StateConfirming }, "code sent")
	s.request(t, dv, map[string]any{"confirm_attempt": code})
	s.waitStatus(t, dv, func(st map[string]any) bool { return st["state"] == StateActive }, "active")
	return dv
}

// A real PouchDB device pairs through its own CouchDB user, with nothing
// anonymous but the sign-up; it then finds its owner's private control
// database in its status, replicates it, and revokes a second device of
// the same owner by replicating a request into it.
func TestDevicePairsThroughItsOwnUserAndRevokesByReplication(t *testing.T) {
	s := startUsersStack(t, nil)
	ctx := context.Background()
	owner := fmt.Sprintf("alice-%s@example.test", randomHex(t, 4))
	phone := s.pair(t, owner, "Alice's phone", 1)
	st := s.waitStatus(t, phone, func(st map[string]any) bool { return st[FieldControlURL] != nil }, "control url")
	url, _ := st[FieldControlURL].(string)
	if url != s.server+"/"+UserDBName(owner) {
		t.Fatalf("control_url %q, want %q", url, s.server+"/"+UserDBName(owner))
	}
	if st := s.self(t, phone); fmt.Sprint(st["roles"]) != fmt.Sprint([]any{OwnerRole(owner)}) {
		t.Fatalf("roles %v, want the owner's role only", st["roles"])
	}
	control := devicetest.Remote{URL: url, User: phone.user, Password: phone.password}
	if err := phone.Replicate(ctx, "control", control, "pull"); err != nil {
		t.Fatal(err)
	}
	info, err := phone.Get(ctx, "control", TrustedID(phone.user))
	if err != nil || info["state"] != StateActive || info[FieldDeviceName] != "Alice's phone" {
		t.Fatalf("own entry in the control database: %v %v", info, err)
	}

	laptop := s.pair(t, owner, "Alice's laptop", 2)
	if _, err := phone.Put(ctx, "control", map[string]any{"_id": "revoke-" + laptop.user, "type": RevokeRequestType,
		"state": StateNew, "target": laptop.user}); err != nil {
		t.Fatal(err)
	}
	if err := phone.Replicate(ctx, "control", control, "push"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for basicAuthStatus(t, "/_session", laptop.user, laptop.password) != 401 {
		if time.Now().After(deadline) {
			t.Fatal("the revoked laptop still logs in")
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitState(t, s.db, TrustedID(laptop.user), StateRevoked, 10*time.Second)
	if err := phone.Replicate(ctx, "control", control, "pull"); err != nil {
		t.Fatal(err)
	}
	if info, err := phone.WaitFor(ctx, "control", TrustedID(laptop.user), map[string]any{"state": StateRevoked}, 20*time.Second); err != nil {
		t.Fatalf("revoked entry: %v %v", info, err)
	}
	if basicAuthStatus(t, "/_session", phone.user, phone.password) != 200 {
		t.Fatal("the phone lost its access with the laptop's")
	}
}

// What the daemon trusts is out of every device's reach: an anonymous
// client, a stranger's device and the device itself are each refused with
// the status CouchDB gives, and a device cannot reset its own attempts.
func TestPairingRefusesStrangersAndForgedCounters(t *testing.T) {
	s := startUsersStack(t, func(o *Options) { o.MaxAttempts = 4 })
	ctx := context.Background()
	owner := fmt.Sprintf("carol-%s@example.test", randomHex(t, 4))
	victim := s.pair(t, owner, "Carol's phone", 1)
	mallory := fmt.Sprintf("mallory-%s@example.test", randomHex(t, 4))
	stranger := s.signUp(t, mallory, "Mallory's")
	s.mailTo(t, mallory, 1)

	userDB := s.server + "/" + UserDBName(owner)
	for _, c := range []struct {
		what, method, url, user, password string
		body                              any
		want                              int
	}{
		{"anonymous read of the control database", "GET", s.server + "/" + s.db.Name() + "/_all_docs", "", "", nil, 401},
		{"a device's read of the control database", "GET", s.server + "/" + s.db.Name() + "/_all_docs", victim.user, victim.password, nil, 401},
		{"a device's write of its trusted document", "PUT", s.server + "/" + s.db.Name() + "/" + TrustedID(victim.user), victim.user, victim.password,
			map[string]any{"type": DocType, "state": StateActive}, 401},
		{"anonymous read of an owner's control database", "GET", userDB + "/_all_docs", "", "", nil, 401},
		{"a stranger's read of an owner's control database", "GET", userDB + "/_all_docs", stranger.user, stranger.password, nil, 401},
		{"a stranger's revoke request", "PUT", userDB + "/revoke-x", stranger.user, stranger.password,
			map[string]any{"type": RevokeRequestType, "state": StateNew, "target": victim.user}, 401},
		{"a stranger's read of the victim's user", "GET", s.server + "/_users/org.couchdb.user:" + victim.user, stranger.user, stranger.password, nil, 404},
		{"a stranger's write of the victim's user", "PUT", s.server + "/_users/org.couchdb.user:" + victim.user, stranger.user, stranger.password,
			map[string]any{"name": victim.user, "type": "user", "roles": []string{}, "state": UserState, "password": "x"}, 403},
		{"a device's edit of its own entry", "PUT", userDB + "/" + TrustedID(victim.user), victim.user, victim.password,
			map[string]any{"type": DeviceInfoType, "state": StateActive}, 403},
	} {
		res, err := stranger.HTTP(ctx, c.method, c.url, c.user, c.password, c.body)
		if err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
		// PouchDB Server answers 401 where CouchDB 3 answers 403 for a
		// logged-in non-member, and 404 or 401 for a foreign user
		// document: any refusal passes, a success never does.
		if res.Status < 400 {
			t.Errorf("%s: %d %s, want refused (%d on CouchDB 3)", c.what, res.Status, res.Body, c.want)
		}
	}

	// The stranger resets its own counters on its user document: they are
	// not where the daemon keeps them, and the lock comes on time.
	for i := range 4 {
		s.request(t, stranger, map[string]any{"confirm_attempt": "00000000", "failed_attempts": 0})
		if i < 3 {
			s.waitStatus(t, stranger, func(st map[string]any) bool {
				n, _ := st[FieldFailedAttempts].(float64)
				return int(n) == i+1
			}, fmt.Sprintf("attempt %d counted", i+1))
		}
	}
	s.waitStatus(t, stranger, func(st map[string]any) bool { return st["state"] == StateLocked }, "locked after 4 wrong codes")
	if n := get(t, s.db, TrustedID(stranger.user))[FieldFailedAttempts]; n != float64(4) {
		t.Fatalf("trusted failed_attempts %v, want 4", n)
	}
}

// PouchDB Server lets a user give itself roles on its own _users document
// (CouchDB 3 refuses it with 403). The daemon takes ungranted roles off
// again: the gap is one mirror run wide on the test server, and closed on
// CouchDB.
func TestSelfGrantedRolesAreTakenOff(t *testing.T) {
	s := startUsersStack(t, nil)
	ctx := context.Background()
	victimOwner := fmt.Sprintf("dave-%s@example.test", randomHex(t, 4))
	eve := fmt.Sprintf("eve-%s@example.test", randomHex(t, 4))
	attacker := s.signUp(t, eve, "Eve's")
	s.mailTo(t, eve, 1)
	doc := s.self(t, attacker)
	doc["roles"] = []string{OwnerRole(victimOwner)}
	doc["password"] = attacker.password
	res, err := attacker.HTTP(ctx, "PUT", s.server+"/_users/org.couchdb.user:"+attacker.user, attacker.user, attacker.password, doc)
	if err != nil {
		t.Fatal(err)
	}
	if res.Status >= 400 {
		t.Logf("the server refused the self-granted role (%d), as CouchDB 3 does", res.Status)
		return
	}
	t.Log("test server gap: PouchDB Server 4.2.0 accepted a self-granted role; the daemon must take it off")
	deadline := time.Now().Add(10 * time.Second)
	for {
		roles := s.self(t, attacker)["roles"]
		if r, ok := roles.([]any); ok && len(r) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("self-granted roles %v still there", roles)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(s.logs.String(), "roles the daemon did not grant") {
		t.Fatal("no log line for the taken-off roles")
	}
}

// A deleted owner's control database, or its _security edited by hand, is
// put back by the heal loop, device entries included.
func TestOwnerControlDatabaseHeals(t *testing.T) {
	s := startUsersStack(t, nil)
	ctx := context.Background()
	owner := fmt.Sprintf("frank-%s@example.test", randomHex(t, 4))
	dv := s.pair(t, owner, "Frank's phone", 1)
	admin := couchtest.Client(t)
	name := UserDBName(owner)
	db := admin.DB(name)
	healed := s.follow.Healed()
	if err := db.SetSecurity(ctx, userDBSecurity("someone-else")); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 10*time.Second, "_security put back", func() (bool, string) {
		sec, err := db.Security(ctx)
		return s.follow.Healed() > healed && err == nil && sameSecurity(sec, userDBSecurity(OwnerRole(owner))), fmt.Sprint(sec, err)
	})
	healed = s.follow.Healed()
	if err := admin.DestroyDB(ctx, name); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 15*time.Second, "database and entry put back", func() (bool, string) {
		var info map[string]any
		err := admin.DB(name).Get(ctx, TrustedID(dv.user)).ScanDoc(&info)
		return s.follow.Healed() > healed && err == nil && info["state"] == StateActive, fmt.Sprint(info, err)
	})
	sec, err := db.Security(ctx)
	if err != nil || !sameSecurity(sec, userDBSecurity(OwnerRole(owner))) {
		t.Fatalf("re-created database's _security %v %v", sec, err)
	}
}

// TestHealChecksABoundedBatchAndWrapsAround: one heal pass checks at most
// HealBatch active devices' owners, the next goes on after them, and after
// the last it starts again, so a database deleted anywhere is put back
// within ceil(devices/HealBatch) passes while a pass costs the same at any
// number of owners.
func TestHealChecksABoundedBatchAndWrapsAround(t *testing.T) {
	ctx := context.Background()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.Pairing = PairingUsers })
	fl, err := f.devs.NewFollowers(FollowerOptions{Engine: workflowtest.Options(t), HealBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	admin := couchtest.Client(t)
	tag := randomHex(t, 4)
	var owners []string
	for i := range 5 {
		owner := fmt.Sprintf("heal-%s-%d@example.test", tag, i)
		owners = append(owners, owner)
		user := fmt.Sprintf("heal%s-%d", tag, i)
		put(t, f.db, map[string]any{"_id": TrustedID(user), "type": DocType, "state": StateActive,
			FieldOwner: owner, FieldCouchUser: user, FieldDeviceName: "d", FieldPairingMode: PairingUsers})
	}
	t.Cleanup(func() {
		for _, o := range owners {
			_ = admin.DestroyDB(context.Background(), UserDBName(o))
		}
	})
	exist := func() int {
		n := 0
		for _, o := range owners {
			if ok, err := admin.DBExists(ctx, UserDBName(o)); err == nil && ok {
				n++
			}
		}
		return n
	}
	for pass, want := range []int{2, 4, 5} {
		if _, err := fl.Heal(ctx); err != nil {
			t.Fatal(err)
		}
		if got := exist(); got != want {
			t.Fatalf("after pass %d: %d owner databases, want %d (at most 2 owners a pass)", pass+1, got, want)
		}
	}
	if err := admin.DestroyDB(ctx, UserDBName(owners[0])); err != nil {
		t.Fatal(err)
	}
	// The third pass reached the end; the next starts again at the first.
	healed, err := fl.Heal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if healed != 1 || exist() != 5 {
		t.Fatalf("pass after the end healed %d, %d databases exist; want the first owner's put back", healed, exist())
	}
	var info map[string]any
	if err := admin.DB(UserDBName(owners[0])).Get(ctx, TrustedID("heal"+tag+"-0")).ScanDoc(&info); err != nil || info["state"] != StateActive {
		t.Fatalf("device entry not put back: %v %v", info, err)
	}
}
