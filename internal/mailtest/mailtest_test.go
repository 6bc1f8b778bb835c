package mailtest_test

import (
	"strings"
	"testing"
	"time"

	"github.com/wneessen/go-mail"

	"github.com/docstate/docstate/internal/mailtest"
)

func send(t *testing.T, host string, port int, user, pass, to string) error {
	t.Helper()
	opts := []mail.Option{mail.WithPort(port), mail.WithTLSPolicy(mail.NoTLS), mail.WithHELO("test.local"),
		mail.WithTimeout(5 * time.Second)}
	if user != "" {
		opts = append(opts, mail.WithSMTPAuth(mail.SMTPAuthPlain), mail.WithUsername(user), mail.WithPassword(pass))
	}
	c, err := mail.NewClient(host, opts...)
	if err != nil {
		t.Fatal(err)
	}
	m := mail.NewMsg()
	if err := m.From("sender@example.test"); err != nil {
		t.Fatal(err)
	}
	if err := m.To(to); err != nil {
		t.Fatal(err)
	}
	m.Subject("hello")
	m.SetMessageIDWithValue("abc@example.test")
	m.SetBodyString(mail.TypeTextPlain, "body text 123")
	return c.DialAndSendWithContext(t.Context(), m)
}

func TestMockReceivesAndRejects(t *testing.T) {
	t.Parallel()
	m := mailtest.StartMock(t, mailtest.MockOptions{Reject550: []string{"gone@example.test"}, Reject421: []string{"busy@example.test"}})
	if err := send(t, m.Host(), m.Port(), "", "", "ok@example.test"); err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := send(t, m.Host(), m.Port(), "", "", "gone@example.test"); err == nil || !strings.Contains(err.Error(), "550") {
		t.Fatalf("send to rejected recipient: %v, want a 550", err)
	}
	if err := send(t, m.Host(), m.Port(), "", "", "busy@example.test"); err == nil || !strings.Contains(err.Error(), "421") {
		t.Fatalf("send to busy recipient: %v, want a 421", err)
	}
	got := m.WaitReceived(t, 1, 5*time.Second)
	if len(got) != 1 || got[0].Header.Get("Message-ID") != "<abc@example.test>" {
		t.Fatalf("received %d messages, want 1 with our Message-ID", len(got))
	}
}

func TestMaildevWithAuth(t *testing.T) {
	t.Parallel()
	m := mailtest.StartMaildev(t, mailtest.MaildevOptions{User: "u", Password: "p4ss"})
	if err := send(t, m.Host(), m.SMTPPort(), "u", "wrong", "a@example.test"); err == nil {
		t.Fatal("send with a wrong password succeeded")
	}
	if err := send(t, m.Host(), m.SMTPPort(), "u", "p4ss", "a@example.test"); err != nil {
		t.Fatalf("send with AUTH: %v", err)
	}
	got := m.WaitEmails(t, 1, 10*time.Second)
	if len(got) != 1 || !strings.Contains(got[0].Text, "body text 123") || got[0].Header("Message-ID") != "<abc@example.test>" {
		t.Fatalf("maildev has %+v", got)
	}
}
