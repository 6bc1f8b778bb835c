package devices

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// twin is a second daemon on f's control database: its own Devices (so no
// in-process state is shared with f's), the same secret and options, its
// own log.
func (f fixture) twin(t testing.TB, mailer Mailer) fixture {
	t.Helper()
	opts := f.devs.opts
	logs := &logBuffer{}
	opts.Logger = testLogger(t, logs)
	opts.Mailer = mailer
	devs, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return fixture{db: f.db, devs: devs, logs: logs}
}

// leaks returns the forms of owner found in s, compared without case: the
// whole address and its local part.
func leaks(s, owner string) []string {
	var out []string
	local, _, _ := strings.Cut(owner, "@")
	for _, p := range []string{owner, local} {
		if strings.Contains(strings.ToLower(s), strings.ToLower(p)) {
			out = append(out, p)
		}
	}
	return out
}

// TestSMTPRejectionRecordsNoAddress: a relay that refuses the recipient
// with 5xx, echoing the address in another letter case as real relays do,
// on the first mail and on a resend. The device ends in error with the
// server's reply as reason, and neither that reason, nor docstate.last_error,
// nor any log line holds the address: go-mail's "affected recipient(s): …"
// and the echo are both scrubbed. A 421 (retried) covers last_error.
func TestSMTPRejectionRecordsNoAddress(t *testing.T) {
	t.Parallel()
	const (
		gone  = "gone.user@example.test"
		busy  = "busy.user@example.test"
		later = "later.user@example.test"
		echo  = "550 5.1.1 <Gone.User@Example.TEST>: Recipient address rejected: mailbox gone.user unknown"
	)
	mock := mailtest.StartMock(t, mailtest.MockOptions{Reject550: []string{gone}, Reject550Reply: echo, Reject421: []string{busy}})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.ResendInterval = time.Millisecond })
	f.start(t, nil)

	// The resend path: a device whose first mail went out, then the relay
	// starts refusing its owner (a mock with new rules on the same port).
	dvLater := newDevice(t, "dev-later", later)
	registerAndMail(t, f, mock, dvLater)
	settled(t, f.db, dvLater.id)

	put(t, f.db, newDevice(t, "dev-gone", gone).doc())
	put(t, f.db, newDevice(t, "dev-busy", busy).doc())
	d := waitState(t, f.db, "dev-gone", workflow.DefaultErrorState, 20*time.Second)
	reason := meta(d)["error"].(map[string]any)["reason"].(string)
	if !strings.Contains(reason, "refused permanently") || !strings.Contains(reason, "550") ||
		!strings.Contains(reason, RedactedOwner) {
		t.Fatalf("550 reason %q: want the refusal, its code and %s", reason, RedactedOwner)
	}
	if l := leaks(reason, gone); l != nil {
		t.Errorf("550 reason %q contains %q", reason, l)
	}
	t.Logf("recorded reason: %s", reason)

	// 421 is retried: last_error is written on every failed attempt.
	var lastErr string
	workflowtest.Eventually(t, 20*time.Second, "421 recorded in last_error", func() (bool, string) {
		d := get(t, f.db, "dev-busy")
		m := meta(d)
		if e, ok := m["error"].(map[string]any); ok {
			lastErr, _ = e["reason"].(string)
			return lastErr != "", mustJSON(m)
		}
		lastErr, _ = m["last_error"].(string)
		return lastErr != "", mustJSON(m)
	})
	if !strings.Contains(lastErr, "temporary") || !strings.Contains(lastErr, RedactedOwner) {
		t.Fatalf("421 last_error %q: want the temporary failure and %s", lastErr, RedactedOwner)
	}
	if l := leaks(lastErr, busy); l != nil {
		t.Errorf("421 last_error %q contains %q", lastErr, l)
	}

	port := mock.Port()
	mock.Stop(t)
	mailtest.StartMock(t, mailtest.MockOptions{Port: port, Reject550: []string{later}, Reject421: []string{busy},
		Reject550Reply: "550 5.1.1 <LATER.USER@example.test>... User unknown"})
	update(t, f.db, dvLater.id, func(d map[string]any) { d[FieldResendRequested] = true })
	d = waitState(t, f.db, dvLater.id, workflow.DefaultErrorState, 20*time.Second)
	resendReason := meta(d)["error"].(map[string]any)["reason"].(string)
	if !strings.Contains(resendReason, "550") || !strings.Contains(resendReason, RedactedOwner) {
		t.Fatalf("resend 550 reason %q", resendReason)
	}
	if l := leaks(resendReason, later); l != nil {
		t.Errorf("resend 550 reason %q contains %q", resendReason, l)
	}
	// Only the second relay answers "User unknown": the resend's own
	// failure is what was recorded, not a leftover of the first mail.
	if !strings.Contains(resendReason, "User unknown") {
		t.Fatalf("resend reason %q is not the second relay's reply", resendReason)
	}

	waitState(t, f.db, "dev-busy", workflow.DefaultErrorState, 30*time.Second)
	logs := f.logs.String()
	if !strings.Contains(logs, "refused permanently") {
		t.Fatalf("the refusal was not logged, so the log check proves nothing:\n%s", logs)
	}
	for _, owner := range []string{gone, busy, later} {
		if l := leaks(logs, owner); l != nil {
			t.Errorf("log contains %q:\n%s", l, logs)
		}
	}
}

// TestGlobalLimitHoldsAcrossDaemons: with a global budget of one mail, the
// first daemon mails alice; a second daemon (its own process state, same
// control database) must then hold back bob's first mail and refuse
// alice's resend, through a real SMTP server with AUTH. Bob's address is
// not charged for the mail it did not get.
func TestGlobalLimitHoldsAcrossDaemons(t *testing.T) {
	t.Parallel()
	md := mailtest.StartMaildev(t, mailtest.MaildevOptions{User: "relay", Password: "relay-pass-9"})
	newMailer := func() Mailer {
		m, err := NewSMTPMailer(SMTPConfig{Host: md.Host(), Port: md.SMTPPort(), TLS: TLSNone,
			Username: "relay", Password: "relay-pass-9", HELO: "docstate.test", Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	a := newFixture(t, newMailer(), func(o *Options) {
		o.GlobalSends, o.GlobalWindow, o.ResendInterval = 1, time.Hour, time.Millisecond
	})
	runA := a.start(t, nil)
	alice := newDevice(t, "dev-alice", "alice@example.test")
	put(t, a.db, alice.doc())
	waitState(t, a.db, alice.id, StateConfirming, 30*time.Second)
	if n := len(md.WaitEmails(t, 1, 10*time.Second)); n != 1 {
		t.Fatalf("%d mails to alice, want 1", n)
	}
	settled(t, a.db, alice.id)
	runA.Stop(t)

	b := a.twin(t, newMailer())
	b.start(t, nil)
	bob := newDevice(t, "dev-bob", "bob@example.test")
	put(t, b.db, bob.doc())
	var doc map[string]any
	workflowtest.Eventually(t, 20*time.Second, "bob's mail delayed", func() (bool, string) {
		doc = get(t, b.db, bob.id)
		return doc[FieldSendDelayed] != nil, mustJSON(doc)
	})
	why, _ := doc[FieldSendDelayed].(string)
	if doc["state"] != StateNew || !strings.Contains(why, "to all addresses") {
		t.Fatalf("bob: state %v, send_delayed %q", doc["state"], why)
	}
	settled(t, b.db, bob.id)
	doc = get(t, b.db, bob.id)
	wake, err := time.Parse(time.RFC3339Nano, meta(doc)["wake_at"].(string))
	if err != nil {
		t.Fatal(err)
	}
	// The next slot: when alice's mail leaves the hour-long window.
	if until := time.Until(wake); until < 55*time.Minute || until > 62*time.Minute {
		t.Fatalf("bob wakes at %v (in %v), want about an hour from now", wake, until)
	}
	if err := b.db.Get(context.Background(), AddressDocID(bob.owner)).Err(); kivik.HTTPStatus(err) != http.StatusNotFound {
		t.Fatalf("bob's address limit document: %v, want 404 (nothing was sent to bob)", err)
	}

	// Alice's resend, now handled by the second daemon, is refused too.
	update(t, b.db, alice.id, func(d map[string]any) { d[FieldResendRequested] = true })
	workflowtest.Eventually(t, 20*time.Second, "alice's resend refused", func() (bool, string) {
		doc = get(t, b.db, alice.id)
		return doc[FieldResendDenied] != nil, mustJSON(doc)
	})
	if why, _ := doc[FieldResendDenied].(string); !strings.HasPrefix(why, "resend refused: too many confirmation mails recently, to all addresses") ||
		doc[FieldSendDelayed] != nil {
		t.Fatalf("alice after the refused resend: %s", mustJSON(doc))
	}
	time.Sleep(500 * time.Millisecond) // a mail sent regardless would have arrived by now
	if n := len(md.WaitEmails(t, 1, 0)); n != 1 {
		t.Fatalf("%d mails in all, want 1: the global limit did not hold across daemons", n)
	}
	if !strings.Contains(b.logs.String(), "global mail limit reached") {
		t.Fatalf("no warning about the global limit in the second daemon's log:\n%s", b.logs.String())
	}
}

// TestGlobalLimitFreesAtNextSlot: a delayed mail goes out by itself once
// the global window has moved past the earlier mail, through the wake-up
// the handler asked for.
func TestGlobalLimitFreesAtNextSlot(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.GlobalSends, o.GlobalWindow = 1, 3*time.Second })
	f.start(t, nil)
	registerAndMail(t, f, mock, newDevice(t, "dev-first", "first@example.test"))
	second := newDevice(t, "dev-second", "second@example.test")
	put(t, f.db, second.doc())
	workflowtest.Eventually(t, 10*time.Second, "second mail delayed or sent", func() (bool, string) {
		d := get(t, f.db, second.id)
		return d[FieldSendDelayed] != nil || d["state"] != StateNew, mustJSON(d)
	})
	if d := get(t, f.db, second.id); d["state"] != StateNew {
		// Only possible if the whole window passed between the two puts.
		t.Fatalf("second mail was not delayed: %s", mustJSON(d))
	}
	d := waitState(t, f.db, second.id, StateConfirming, 20*time.Second)
	if d[FieldSendDelayed] != nil {
		t.Fatalf("send_delayed kept after the mail went out: %s", mustJSON(d))
	}
	if n := len(mock.WaitReceived(t, 2, 10*time.Second)); n != 2 {
		t.Fatalf("%d mails, want 2", n)
	}
}

func TestRedactor(t *testing.T) {
	t.Parallel()
	r := redactor{owner: "Alice.B@Example.com", keep: []string{"docstate@example.test"}}
	for _, tc := range []struct{ in, want string }{
		{"sending SMTP RCPT TO command: 550 User not found, affected recipient(s): alice.b@example.com",
			"sending SMTP RCPT TO command: 550 User not found, affected recipient(s): <owner>"},
		{"550 5.1.1 <ALICE.B@EXAMPLE.COM>: Recipient address rejected", "550 5.1.1 <<owner>>: Recipient address rejected"},
		{"550 mailbox alice.b unknown", "550 mailbox <owner> unknown"},
		{"550 alice.bob is someone else", "550 alice.bob is someone else"},
		{"forwarded to carol@example.org.", "forwarded to <address>."},
		{"from docstate@example.test refused", "from docstate@example.test refused"},
		{"send confirmation mail 0123456789abcdef0123456789abcdef@example.test: x",
			"send confirmation mail 0123456789abcdef0123456789abcdef@example.test: x"},
		{"no address here @ all", "no address here @ all"},
	} {
		if got := r.text(tc.in); got != tc.want {
			t.Errorf("text(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	// The chain survives: the engine decides terminal or retry on it.
	inner := workflow.Terminal(errors.New("550 for alice.b@example.com"))
	err := r.err(fmt.Errorf("send: %w", inner))
	if !workflow.IsTerminal(err) || !errors.Is(err, inner) || strings.Contains(err.Error(), "alice") {
		t.Fatalf("err: %v (terminal %v)", err, workflow.IsTerminal(err))
	}
	if err := r.err(nil); err != nil {
		t.Fatalf("err(nil) = %v", err)
	}
	// An owner whose local part is the placeholder's word is not doubled.
	if got := (redactor{owner: "owner@example.com"}).text("to owner@example.com"); got != "to <owner>" {
		t.Fatalf("owner@: %q", got)
	}
}

// TestGlobalLimitExactOverShards: a budget of 20 is split over 16 shard
// documents (quotas 2 and 1); 26 devices of 26 addresses, handled by two
// daemons at once, get exactly 20 mails, and the other 6 wait with
// send_delayed. Exact although sends race for the last shards with room.
func TestGlobalLimitExactOverShards(t *testing.T) {
	t.Parallel()
	const budget, n = 20, 26
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	a := newFixture(t, mockMailer(t, mock), func(o *Options) { o.GlobalSends, o.GlobalWindow = budget, time.Hour })
	b := a.twin(t, mockMailer(t, mock))
	if got := a.devs.globalShardCount(); got != globalShards {
		t.Fatalf("%d shards, want %d: the test would not exercise the split", got, globalShards)
	}
	var docs []any
	for i := range n {
		docs = append(docs, newDevice(t, fmt.Sprintf("dev-%02d", i), fmt.Sprintf("user%02d@example.test", i)).doc())
	}
	if _, err := a.db.BulkDocs(context.Background(), docs); err != nil {
		t.Fatal(err)
	}
	a.start(t, nil)
	b.start(t, nil)
	var confirming, delayed int
	workflowtest.Eventually(t, 60*time.Second, "every device mailed or delayed", func() (bool, string) {
		confirming, delayed = 0, 0
		for i := range n {
			d := get(t, a.db, fmt.Sprintf("dev-%02d", i))
			switch {
			case d["state"] == StateConfirming:
				confirming++
			case d[FieldSendDelayed] != nil:
				delayed++
			}
		}
		return confirming+delayed == n, fmt.Sprintf("%d confirming, %d delayed", confirming, delayed)
	})
	time.Sleep(500 * time.Millisecond) // a mail past the budget would arrive by now
	if mails := len(mock.Received(t)); confirming != budget || delayed != n-budget || mails != budget {
		t.Fatalf("%d confirming, %d delayed, %d mails; want %d, %d, %d", confirming, delayed, mails, budget, n-budget, budget)
	}
	used := 0
	for k := range globalShards {
		var doc globalDoc
		if err := a.db.Get(context.Background(), GlobalDocID(k)).ScanDoc(&doc); err != nil {
			t.Fatalf("shard %d: %v", k, err)
		}
		sum := 0
		for _, s := range doc.Slots {
			sum += s.Sends
		}
		if sum != a.devs.globalQuota(k) {
			t.Errorf("shard %d counts %d, quota %d", k, sum, a.devs.globalQuota(k))
		}
		used += sum
	}
	if used != budget {
		t.Fatalf("shards count %d mails, want %d", used, budget)
	}
}

// TestAddressLimitSpendsNoGlobalBudget: the second device of an owner whose
// address limit is used up waits with the address reason, and the global
// budget counts only the one mail that went out.
func TestAddressLimitSpendsNoGlobalBudget(t *testing.T) {
	t.Parallel()
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	f := newFixture(t, mockMailer(t, mock), func(o *Options) { o.AddressSends, o.GlobalSends = 1, 1 })
	f.start(t, nil)
	registerAndMail(t, f, mock, newDevice(t, "dev-one", "same@example.test"))
	put(t, f.db, newDevice(t, "dev-two", "same@example.test").doc())
	var d map[string]any
	workflowtest.Eventually(t, 10*time.Second, "second mail delayed", func() (bool, string) {
		d = get(t, f.db, "dev-two")
		return d[FieldSendDelayed] != nil, mustJSON(d)
	})
	if why := d[FieldSendDelayed].(string); d["state"] != StateNew || !strings.HasPrefix(why, "too many mails to this address recently") {
		t.Fatalf("second device: %s", mustJSON(d))
	}
	var shard globalDoc
	if err := f.db.Get(context.Background(), GlobalDocID(0)).ScanDoc(&shard); err != nil {
		t.Fatal(err)
	}
	if len(shard.Slots) != 1 || shard.Slots[0].Sends != 1 {
		t.Fatalf("global budget after one mail and one refused: %+v", shard.Slots)
	}
	if n := len(mock.Received(t)); n != 1 {
		t.Fatalf("%d mails, want 1", n)
	}
}
