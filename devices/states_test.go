package devices

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

func meta(doc map[string]any) map[string]any {
	m, _ := doc["docstate"].(map[string]any)
	return m
}

func TestThreeEnginesTwoHundredDevicesTwoHundredMails(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), nil)
	const n = 200
	var docs []any
	for i := range n {
		docs = append(docs, newDevice(t, fmt.Sprintf("dev-%03d", i), fmt.Sprintf("user%03d@example.test", i)).doc())
	}
	if _, err := f.db.BulkDocs(context.Background(), docs); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		f.start(t, nil)
	}
	workflowtest.Eventually(t, 120*time.Second, "all confirming", func() (bool, string) {
		c := 0
		for i := range n {
			if get(t, f.db, fmt.Sprintf("dev-%03d", i))["state"] == StateConfirming {
				c++
			}
		}
		return c == n, fmt.Sprintf("%d confirming", c)
	})
	time.Sleep(time.Second) // any duplicate would arrive by now
	mails := mock.Received(t)
	if len(mails) != n {
		t.Fatalf("%d mails for %d devices", len(mails), n)
	}
	seen := map[string]bool{}
	for _, m := range mails {
		id := m.Header.Get("Message-ID")
		if seen[id] {
			t.Fatalf("Message-ID %s twice", id)
		}
		seen[id] = true
	}
	if a := mock.Attempts(); a != n {
		t.Fatalf("%d SMTP transactions, want %d", a, n)
	}
}

// blockingMailer sends, then blocks until its context ends: an engine
// killed between sending and recording.
type blockingMailer struct {
	inner Mailer
	sent  atomic.Int32
}

func (b *blockingMailer) Send(ctx context.Context, m Message) error {
	if err := b.inner.Send(ctx, m); err != nil {
		return err
	}
	b.sent.Add(1)
	<-ctx.Done()
	return ctx.Err()
}

// TestKilledBetweenSendAndRecord: the declared policy is RetryExpired with
// the same idempotency key, so the resend is the same mail: same
// Message-ID, same code. The recorded hash matches that code.
func TestKilledBetweenSendAndRecord(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	blocking := &blockingMailer{inner: mockMailer(t, mock)}
	f := newFixture(t, blocking, func(o *Options) { o.HandlerTimeout, o.Lease = 2*time.Second, 3*time.Second })
	dv := newDevice(t, "dev-crash", "crash@example.test")
	put(t, f.db, dv.doc())
	eng := f.start(t, func(o *workflow.Options) { o.DrainTimeout = time.Millisecond })
	workflowtest.Eventually(t, 20*time.Second, "mail sent", func() (bool, string) { return blocking.sent.Load() == 1, "" })
	eng.Stop(t) // hard stop: the handler is cut off before its result is written
	doc := get(t, f.db, dv.id)
	if doc["state"] != StateNew || meta(doc)["claim"] == nil {
		t.Fatalf("after the crash: %s", mustJSON(doc))
	}

	// Restart with a mailer that returns: after the lease the claim is
	// taken over and the mail sent again.
	f2 := f
	opts := f.devs.opts
	opts.Mailer = blocking.inner
	devs, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	f2.devs = devs
	f2.start(t, nil)
	doc = waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)
	mails := mock.WaitReceived(t, 2, 5*time.Second)
	if len(mails) != 2 {
		t.Fatalf("%d mails, want 2 (the first and the resend)", len(mails))
	}
	id1, id2 := mails[0].Header.Get("Message-ID"), mails[1].Header.Get("Message-ID")
	if id1 != id2 || id1 != "<"+doc[FieldMessageID].(string)+">" {
		t.Fatalf("Message-IDs %s and %s, recorded %v: want one and the same", id1, id2, doc[FieldMessageID])
	}
	c1, c2 := codeIn(t, readBody(t, mails[0])), codeIn(t, readBody(t, mails[1]))
	if c1 != c2 {
		t.Fatal("the resend carries a different code")
	}
	if m := meta(doc); m["from"] != StateNew {
		t.Fatalf("meta %v", m)
	}
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = c1 })
	waitState(t, f.db, dv.id, StateActive, 30*time.Second)
}

func TestWrongCodeTooManyAttemptsAndResendTooSoon(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.MaxAttempts = 3 })
	f.start(t, nil)
	dv := newDevice(t, "dev-wrong", "wrong@example.test")
	code := codeIn(t, registerAndMail(t, f, mock, dv))
	wrong := fmt.Sprintf("%08d", (atoi(code)+1)%100_000_000)

	// Resend too soon: denied with a reason, still confirming, no mail.
	settled(t, f.db, dv.id)
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldResendRequested] = true })
	workflowtest.Eventually(t, 10*time.Second, "resend denied", func() (bool, string) {
		d := get(t, f.db, dv.id)
		r, _ := d[FieldResendDenied].(string)
		return strings.HasPrefix(r, "resend too soon") && d[FieldResendRequested] == nil, mustJSON(d)
	})

	// Wrong code: counted, reason recorded, still confirming.
	for i := 1; i <= 2; i++ {
		settled(t, f.db, dv.id)
		update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = wrong })
		workflowtest.Eventually(t, 10*time.Second, "attempt counted", func() (bool, string) {
			d := get(t, f.db, dv.id)
			return d[FieldFailedAttempts] == float64(i) && d[FieldConfirmAttempt] == nil && d[FieldPendingCheck] == nil, mustJSON(d)
		})
	}
	d := get(t, f.db, dv.id)
	if d["state"] != StateConfirming || !strings.HasPrefix(d[FieldLastAttemptError].(string), "wrong code (attempt 2 of 3)") {
		t.Fatalf("after 2 wrong codes: %s", mustJSON(d))
	}
	// Third wrong code: locked, and the right code no longer helps.
	settled(t, f.db, dv.id)
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = "not a code" })
	d = waitState(t, f.db, dv.id, StateLocked, 10*time.Second)
	if d[FieldReason] != "locked after 3 wrong confirmation attempts" || d[FieldCodeHash] != nil {
		t.Fatalf("locked doc: %s", mustJSON(d))
	}
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = code })
	time.Sleep(time.Second)
	if d = get(t, f.db, dv.id); d["state"] != StateLocked {
		t.Fatalf("right code after lock: %s", mustJSON(d))
	}
	if s := basicAuthStatus(t, "/_session", UserName(dv.id, dv.creds.Salt), dv.password); s != http.StatusUnauthorized {
		t.Fatalf("locked device can log in: %d", s)
	}
	if n := len(mock.Received(t)); n != 1 {
		t.Fatalf("%d mails, want 1", n)
	}
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

func TestExpiredCodeAndResendAllowed(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.CodeTTL, o.ResendInterval = 3*time.Second, time.Millisecond })
	f.start(t, nil)

	// Resend after the interval: a new code replaces the old one.
	dv := newDevice(t, "dev-resend", "resend@example.test")
	old := codeIn(t, registerAndMail(t, f, mock, dv))
	settled(t, f.db, dv.id)
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldResendRequested] = true })
	mails := mock.WaitReceived(t, 2, 10*time.Second)
	if len(mails) != 2 || mails[0].Header.Get("Message-ID") == mails[1].Header.Get("Message-ID") {
		t.Fatalf("resend: %d mails", len(mails))
	}
	fresh := codeIn(t, readBody(t, mails[1]))
	workflowtest.Eventually(t, 10*time.Second, "resend recorded", func() (bool, string) {
		d := get(t, f.db, dv.id)
		return d[FieldSends] == float64(2) && d[FieldResendRequested] == nil, mustJSON(d)
	})
	if old != fresh {
		settled(t, f.db, dv.id)
		update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = old })
		workflowtest.Eventually(t, 10*time.Second, "old code refused", func() (bool, string) {
			d := get(t, f.db, dv.id)
			return d[FieldFailedAttempts] == float64(1), mustJSON(d)
		})
	}

	// Nobody acts: the timed scan moves the device to expired.
	d := waitState(t, f.db, dv.id, StateExpired, 15*time.Second)
	if r, _ := d[FieldReason].(string); !strings.HasPrefix(r, "confirmation code expired at") || d[FieldCodeHash] != nil {
		t.Fatalf("expired doc: %s", mustJSON(d))
	}
	// An attempt after expiry changes nothing.
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = fresh })
	time.Sleep(time.Second)
	if d = get(t, f.db, dv.id); d["state"] != StateExpired {
		t.Fatalf("code accepted after expiry: %s", mustJSON(d))
	}
}

func TestInvalidInputEndsInErrorWithoutMail(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), nil)
	f.start(t, nil)
	base := func(id string) map[string]any { return newDevice(t, id, "ok@example.test").doc() }
	cases := map[string]struct {
		mod  func(map[string]any)
		want string
	}{
		"crlf-owner":      {func(d map[string]any) { d[FieldOwner] = "a@example.test\r\nBcc: victim@example.test" }, "owner contains a control"},
		"lf-owner":        {func(d map[string]any) { d[FieldOwner] = "a@example.test\nX: y" }, "owner contains a control"},
		"crlf-name":       {func(d map[string]any) { d[FieldDeviceName] = "phone\r\nBcc: victim@example.test" }, "device_name contains the non-printable"},
		"invalid-address": {func(d map[string]any) { d[FieldOwner] = "not-an-address" }, "owner is not an email address"},
		"display-name":    {func(d map[string]any) { d[FieldOwner] = "Eve <eve@example.test>" }, "owner contains a control, space"},
		"two-at":          {func(d map[string]any) { d[FieldOwner] = "a@b@example.test" }, "owner is not an email address"},
		"owner-number":    {func(d map[string]any) { d[FieldOwner] = 42 }, "owner must be a string"},
		"oversize-owner":  {func(d map[string]any) { d[FieldOwner] = strings.Repeat("a", 300) + "@example.test" }, "more than 254"},
		"oversize-name":   {func(d map[string]any) { d[FieldDeviceName] = strings.Repeat("x", 65) }, "more than 64"},
		"oversize-doc":    {func(d map[string]any) { d["junk"] = strings.Repeat("x", 20000) }, "more than the limit"},
		"plain-password":  {func(d map[string]any) { d[FieldCredentials] = map[string]any{"password": "hunter2"} }, "password_scheme must be"},
		"bad-key": {func(d map[string]any) {
			c := d[FieldCredentials].(Credentials)
			c.DerivedKey = strings.ToUpper(c.DerivedKey[:20]) + c.DerivedKey[:20]
			d[FieldCredentials] = c
		}, "derived_key must be"},
		"huge-iterations": {func(d map[string]any) {
			c := d[FieldCredentials].(Credentials)
			c.Iterations = 1 << 30
			d[FieldCredentials] = c
		}, "iterations must be between"},
		"short-salt": {func(d map[string]any) {
			c := d[FieldCredentials].(Credentials)
			c.Salt = "abcd"
			d[FieldCredentials] = c
		}, "salt must be"},
		"no-credentials": {func(d map[string]any) { delete(d, FieldCredentials) }, "credentials is missing"},
	}
	for id, tc := range cases {
		d := base(id)
		tc.mod(d)
		put(t, f.db, d)
	}
	for id, tc := range cases {
		d := waitState(t, f.db, id, workflow.DefaultErrorState, 20*time.Second)
		e, _ := meta(d)["error"].(map[string]any)
		reason, _ := e["reason"].(string)
		if !strings.HasPrefix(reason, "invalid device document: ") || !strings.Contains(reason, tc.want) || e["attempts"] != float64(1) {
			t.Errorf("%s: reason %q, want it to contain %q", id, reason, tc.want)
		}
	}
	if n := mock.Attempts(); n != 0 {
		t.Fatalf("%d SMTP transactions for invalid devices, want 0", n)
	}
}

func TestSMTPPermanentAndTemporaryFailures(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{Reject550: []string{"gone@example.test"}, Reject421: []string{"busy@example.test"}})
	f := newFixture(t, mockMailer(t, mock), nil)
	f.start(t, nil)
	put(t, f.db, newDevice(t, "dev-gone", "gone@example.test").doc())
	put(t, f.db, newDevice(t, "dev-busy", "busy@example.test").doc())
	d := waitState(t, f.db, "dev-gone", workflow.DefaultErrorState, 20*time.Second)
	e := meta(d)["error"].(map[string]any)
	if r := e["reason"].(string); !strings.Contains(r, "refused permanently") || !strings.Contains(r, "550") || e["attempts"] != float64(1) {
		t.Fatalf("550: %s", mustJSON(e))
	}
	// 421 is retried with backoff, so attempts grow, until the engine's
	// limit sends it to the error state with the last reason.
	d = waitState(t, f.db, "dev-busy", workflow.DefaultErrorState, 30*time.Second)
	e = meta(d)["error"].(map[string]any)
	if r := e["reason"].(string); !strings.Contains(r, "temporary") || e["attempts"].(float64) < 2 {
		t.Fatalf("421: %s", mustJSON(e))
	}
}

// TestDeviceOfACannotReadB: a channel database admits members by owner
// role; B's device is refused on A's database and admitted on B's.
func TestDeviceOfACannotReadB(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), nil)
	f.start(t, nil)
	a := newDevice(t, "dev-a", "a@example.test")
	b := newDevice(t, "dev-b", "b@example.test")
	for i, dv := range []device{a, b} {
		put(t, f.db, dv.doc())
		waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)
		code := codeIn(t, readBody(t, mock.WaitReceived(t, i+1, 10*time.Second)[i]))
		update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = code })
		waitState(t, f.db, dv.id, StateActive, 30*time.Second)
	}
	admin := couchtest.Client(t)
	chanA, chanB := couchtest.NewDB(t, admin), couchtest.NewDB(t, admin)
	for db, owner := range map[string]string{chanA.Name(): a.owner, chanB.Name(): b.owner} {
		sec := map[string]any{"admins": map[string]any{"names": []string{}, "roles": []string{}},
			"members": map[string]any{"names": []string{}, "roles": []string{OwnerRole(owner)}}}
		if _, err := admin.DB(db).Put(context.Background(), "seed", map[string]any{"v": 1}); err != nil {
			t.Fatal(err)
		}
		if err := admin.DB(db).SetSecurity(context.Background(), securityOf(sec)); err != nil {
			t.Fatal(err)
		}
	}
	userA, userB := UserName(a.id, a.creds.Salt), UserName(b.id, b.creds.Salt)
	for _, tc := range []struct {
		user, pw, db string
		ok           bool
	}{
		{userA, a.password, chanA.Name(), true},
		{userB, b.password, chanB.Name(), true},
		{userB, b.password, chanA.Name(), false},
		{userA, a.password, chanB.Name(), false},
	} {
		s := basicAuthStatus(t, "/"+tc.db+"/seed", tc.user, tc.pw)
		if tc.ok && s != http.StatusOK || !tc.ok && s != http.StatusUnauthorized && s != http.StatusForbidden {
			t.Errorf("%s on %s: %d (want ok=%v)", tc.user, tc.db, s, tc.ok)
		}
	}
}

// TestConcurrentAttemptsCannotExceedLimit: three engines, attackers writing
// wrong codes as fast as they can: no more than MaxAttempts checks happen,
// and the device ends locked.
func TestConcurrentAttemptsCannotExceedLimit(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	const limit = 4
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.MaxAttempts = limit })
	// The guesses checked, by the attempt number each was counted as: a
	// pending guess may be checked again after its result write lost (the
	// same guess), never a new guess under an old count.
	var mu sync.Mutex
	checked := map[int]map[string]bool{}
	f.devs.onCheck = func(_ string, p pendingCheck) {
		mu.Lock()
		defer mu.Unlock()
		if checked[p.Attempt] == nil {
			checked[p.Attempt] = map[string]bool{}
		}
		checked[p.Attempt][deref(p.Code)+"|"+deref(p.Link)] = true
	}
	for range 3 {
		f.start(t, nil)
	}
	dv := newDevice(t, "dev-brute", "brute@example.test")
	code := codeIn(t, registerAndMail(t, f, mock, dv))

	var wg sync.WaitGroup
	var written atomic.Int32
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for w := range 6 {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				doc := get(t, f.db, dv.id)
				if doc["state"] != StateConfirming {
					return
				}
				guess := fmt.Sprintf("%08d", (atoi(code)+1+w*1000+i)%100_000_000)
				doc[FieldConfirmAttempt] = guess
				if _, err := f.db.Put(ctx, dv.id, doc); err == nil {
					written.Add(1)
				}
			}
		})
	}
	waitState(t, f.db, dv.id, StateLocked, 30*time.Second)
	cancel()
	wg.Wait()
	d := get(t, f.db, dv.id)
	mu.Lock()
	distinct := 0
	for n, guesses := range checked {
		distinct += len(guesses)
		if n < 1 || n > limit || len(guesses) != 1 {
			t.Errorf("attempt %d (limit %d): %d different guesses checked (%d guesses written)", n, limit, len(guesses), written.Load())
		}
	}
	mu.Unlock()
	if d[FieldFailedAttempts] != float64(limit) {
		t.Fatalf("failed_attempts %v, want %d", d[FieldFailedAttempts], limit)
	}
	t.Logf("%d guesses written by 6 attackers, %d counted and checked (%d checks), device locked", written.Load(), distinct, f.devs.verifications.Load())
}

// A device that replicates in a side branch forked from an older confirming
// revision (failed_attempts 0) and longer than the current one, so that it
// wins, must not get a fresh set of attempts.
func TestConflictingBranchCannotResetAttempts(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.MaxAttempts = 3 })
	f.start(t, nil)
	dv := newDevice(t, "dev-branch", "branch@example.test")
	put(t, f.db, dv.doc())
	waitState(t, f.db, dv.id, StateConfirming, 30*time.Second)
	code := codeIn(t, readBody(t, mock.WaitReceived(t, 1, 10*time.Second)[0]))
	// The fork point is the settled confirming revision, not the first one
	// seen in confirming: that may be the revision carrying the unsafe
	// handler's claim, and a branch replicated from it would bring back a
	// claim whose lease (10s here) the engine must wait out before it runs
	// the handler that merges the branches, a wait longer than the test's
	// on a busy machine. A replica that forked while the claim was live is
	// not what this test is about: a lower attempt count winning is.
	settled(t, f.db, dv.id)
	fork := get(t, f.db, dv.id)
	if meta, _ := fork["docstate"].(map[string]any); fork["state"] != StateConfirming || meta["claim"] != nil || (fork[FieldFailedAttempts] != nil && fork[FieldFailedAttempts] != float64(0)) {
		t.Fatalf("fork point is not a settled confirming revision without attempts: %s", mustJSON(fork))
	}
	wrong := fmt.Sprintf("%08d", (atoi(code)+1)%100_000_000)
	for i := 1; i <= 2; i++ {
		settled(t, f.db, dv.id)
		update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = wrong })
		workflowtest.Eventually(t, 10*time.Second, "attempt counted", func() (bool, string) {
			d := get(t, f.db, dv.id)
			return d[FieldFailedAttempts] == float64(i), mustJSON(d)
		})
	}
	settled(t, f.db, dv.id)

	// The side branch: the fork point's body (no failed attempts), three
	// revisions longer than the current winner, written as replication does.
	cur := get(t, f.db, dv.id)
	forkRev := fork["_rev"].(string)
	forkGen, forkHash, _ := strings.Cut(forkRev, "-")
	curGen, _, _ := strings.Cut(cur["_rev"].(string), "-")
	start := atoi(curGen) + 3
	ids := []string{}
	for g := start; g > atoi(forkGen); g-- {
		ids = append(ids, randomHex(t, 16))
	}
	ids = append(ids, forkHash)
	branch := map[string]any{}
	for k, v := range fork {
		branch[k] = v
	}
	branch["_rev"] = fmt.Sprintf("%d-%s", start, ids[0])
	branch["_revisions"] = map[string]any{"start": start, "ids": ids}
	res, err := f.db.BulkDocs(context.Background(), []any{branch}, kivik.Param("new_edits", false))
	if err != nil || (len(res) > 0 && res[0].Error != nil) {
		t.Fatalf("replicate side branch: %v %+v", err, res)
	}
	workflowtest.Eventually(t, 10*time.Second, "branch wins", func() (bool, string) {
		d := get(t, f.db, dv.id)
		return d["_rev"] == branch["_rev"] || d[FieldFailedAttempts] == float64(2), mustJSON(d)
	})
	// One more wrong code is the third: locked, not "attempt 1 of 3".
	workflowtest.Eventually(t, 10*time.Second, "winner carries the highest count", func() (bool, string) {
		d := get(t, f.db, dv.id)
		return d[FieldFailedAttempts] == float64(2), mustJSON(d)
	})
	settled(t, f.db, dv.id)
	update(t, f.db, dv.id, func(d map[string]any) { d[FieldConfirmAttempt] = wrong })
	d := waitState(t, f.db, dv.id, StateLocked, 10*time.Second)
	if d[FieldFailedAttempts] != float64(3) {
		t.Fatalf("locked doc: %s", mustJSON(d))
	}
	var conflicts struct {
		Conflicts []string `json:"_conflicts"`
	}
	if err := f.db.Get(context.Background(), dv.id, kivik.Param("conflicts", true)).ScanDoc(&conflicts); err != nil || len(conflicts.Conflicts) != 0 {
		t.Fatalf("conflicting revisions left: %v %v", conflicts.Conflicts, err)
	}
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}
