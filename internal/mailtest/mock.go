package mailtest

import (
	"net"
	"net/mail"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	smtpmock "github.com/mocktools/go-smtp-mock/v2"
)

// MockOptions script the in-process server's replies.
type MockOptions struct {
	// Reject550 lists recipients refused with "550 User not found"
	// (permanent).
	Reject550 []string
	// Reject550Reply is the whole reply line to a Reject550 recipient's
	// RCPT TO, code included; empty = "550 User not found". Real relays
	// often echo the address ("550 5.1.1 <a@b>: Recipient address
	// rejected"), which tests of what reaches logs need.
	Reject550Reply string
	// Reject421 lists recipients refused with "421 Service not available"
	// (temporary).
	Reject421 []string
	// Port to listen on; 0 picks a free one. A test that stops a mock and
	// starts another on the same port simulates a relay going away.
	Port int
}

// Mock is an in-process SMTP server on 127.0.0.1.
type Mock struct {
	srv      *smtpmock.Server
	stopOnce sync.Once
}

// StartMock starts a mock SMTP server on a free loopback port and stops it
// when the test ends.
func StartMock(tb testing.TB, opts MockOptions) *Mock {
	tb.Helper()
	srv := smtpmock.New(smtpmock.ConfigurationAttr{
		HostAddress:                 "127.0.0.1",
		MultipleRcptto:              true,
		MultipleMessageReceiving:    true,
		NotRegisteredEmails:         opts.Reject550,
		MsgRcpttoNotRegisteredEmail: opts.Reject550Reply,
		BlacklistedRcpttoEmails:     opts.Reject421,
		SessionTimeout:              30,
		PortNumber:                  opts.Port,
	})
	if err := srv.Start(); err != nil {
		tb.Fatalf("mailtest: start mock SMTP server: %v", err)
	}
	m := &Mock{srv: srv}
	tb.Cleanup(func() { m.Stop(tb) })
	return m
}

// Stop stops the server: connections are refused until another mock
// starts on its port. Stopping twice is fine.
func (m *Mock) Stop(tb testing.TB) {
	m.stopOnce.Do(func() {
		if err := m.srv.Stop(); err != nil {
			tb.Logf("mailtest: stop mock SMTP server: %v", err)
		}
	})
}

// Host is the server's address without the port.
func (m *Mock) Host() string { return "127.0.0.1" }

// Port is the server's port.
func (m *Mock) Port() int { return m.srv.PortNumber() }

// Addr is host:port.
func (m *Mock) Addr() string { return net.JoinHostPort(m.Host(), strconv.Itoa(m.Port())) }

// Received returns every message accepted so far (DATA completed with 250),
// parsed. Messages the server refused are not included.
func (m *Mock) Received(tb testing.TB) []*mail.Message {
	tb.Helper()
	var out []*mail.Message
	for _, msg := range m.srv.Messages() {
		if !msg.Msg() || !strings.HasPrefix(msg.MsgResponse(), "250") {
			continue
		}
		parsed, err := mail.ReadMessage(strings.NewReader(msg.MsgRequest()))
		if err != nil {
			tb.Fatalf("mailtest: parse received message: %v", err)
		}
		out = append(out, parsed)
	}
	return out
}

// Attempts counts SMTP sessions that got as far as MAIL FROM, accepted or
// not: how often a client tried to send.
func (m *Mock) Attempts() int {
	n := 0
	for _, msg := range m.srv.Messages() {
		if msg.Mailfrom() {
			n++
		}
	}
	return n
}

// WaitReceived polls until at least n messages arrived or timeout passes,
// and returns what arrived.
func (m *Mock) WaitReceived(tb testing.TB, n int, timeout time.Duration) []*mail.Message {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := m.Received(tb)
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}
