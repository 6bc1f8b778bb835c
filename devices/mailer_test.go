package devices

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/workflow"
)

// smtpFault is how faultySMTP ends a session after the message's DATA.
type smtpFault int

const (
	// dropAfterAccept answers 250 to the end of DATA and closes the
	// connection at once: the NOOP/RSET go-mail sends next and its QUIT
	// find it gone.
	dropAfterAccept smtpFault = iota
	// dropOnQuit answers 250 to the end of DATA, NOOP and RSET, and closes
	// on QUIT without its 221.
	dropOnQuit
	// tempReject answers 451 to the end of DATA, then closes: the message
	// was not taken.
	tempReject
	// permReject answers 554 to the end of DATA, then closes.
	permReject
)

// faultySMTP is a minimal SMTP responder on loopback for the faults a real
// server cannot be told to produce: it accepts or refuses one message per
// connection as fault says, then breaks the session. It counts the messages
// it accepted (250 to DATA) and records the commands it saw after DATA.
type faultySMTP struct {
	ln    net.Listener
	fault smtpFault
	wg    sync.WaitGroup

	mu       sync.Mutex
	accepted int
	after    []string // commands received after the end of DATA
}

func startFaultySMTP(t *testing.T, fault smtpFault) *faultySMTP {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &faultySMTP{ln: ln, fault: fault}
	s.wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() { s.serve(conn) })
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *faultySMTP) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

func (s *faultySMTP) counts() (accepted int, after []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted, append([]string(nil), s.after...)
}

func (s *faultySMTP) serve(conn net.Conn) {
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	reply := func(lines ...string) bool {
		_, err := fmt.Fprint(conn, strings.Join(lines, "\r\n")+"\r\n")
		return err == nil
	}
	if !reply("220 faulty.test ESMTP") {
		return
	}
	dataDone := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		cmd := strings.ToUpper(strings.TrimSpace(line))
		verb, _, _ := strings.Cut(cmd, " ")
		if dataDone {
			s.mu.Lock()
			s.after = append(s.after, verb)
			s.mu.Unlock()
		}
		switch verb {
		case "EHLO":
			if !reply("250-faulty.test", "250-8BITMIME", "250 SIZE 1000000") {
				return
			}
		case "HELO", "MAIL", "RCPT", "NOOP", "RSET":
			if !reply("250 OK") {
				return
			}
		case "QUIT":
			if s.fault == dropOnQuit {
				return
			}
			reply("221 bye")
			return
		case "DATA":
			if !reply("354 go ahead") {
				return
			}
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			dataDone = true
			switch s.fault {
			case tempReject:
				reply("451 4.3.0 try later")
				return
			case permReject:
				reply("554 5.7.1 refused")
				return
			}
			s.mu.Lock()
			s.accepted++
			s.mu.Unlock()
			if !reply("250 2.0.0 queued as 42") || s.fault == dropAfterAccept {
				return
			}
		default:
			if !reply("502 unknown command") {
				return
			}
		}
	}
}

// TestSendAcceptedThenConnectionLost: once the relay answered 250 to the
// message, a session that breaks afterwards (RSET or QUIT fails) is a
// successful send with a warning. Reporting it as a failure would make the
// engine retry, and the recipient would get the mail twice.
func TestSendAcceptedThenConnectionLost(t *testing.T) {
	t.Parallel()
	msg := Message{To: "a@example.test", From: "docstate@example.test", Subject: "code",
		Text: "12345678", MessageID: "abc@example.test"}
	for _, tc := range []struct {
		name  string
		fault smtpFault
		// wantErr: "" = success with a warning logged, else "temporary" or
		// "permanent" for the classification of the failure.
		wantErr  string
		accepted int
	}{
		{"dropped after accept", dropAfterAccept, "", 1},
		{"dropped on QUIT", dropOnQuit, "", 1},
		// The fix must not turn real refusals into successes.
		{"451 to DATA", tempReject, "temporary", 0},
		{"554 to DATA", permReject, "permanent", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := startFaultySMTP(t, tc.fault)
			logs := &logBuffer{}
			m, err := NewSMTPMailer(SMTPConfig{Host: "127.0.0.1", Port: srv.port(), TLS: TLSNone,
				HELO: "docstate.test", Timeout: 5 * time.Second, Logger: testLogger(t, logs)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			err = m.Send(ctx, msg)
			accepted, after := srv.counts()
			if accepted != tc.accepted {
				t.Fatalf("server accepted %d messages, want %d", accepted, tc.accepted)
			}
			switch tc.wantErr {
			case "":
				if err != nil {
					t.Fatalf("Send after the relay accepted the message: %v (commands after DATA: %v)", err, after)
				}
				// The fault must really have hit the session's end, or
				// this case proves nothing.
				if len(after) == 0 && tc.fault == dropOnQuit {
					t.Fatal("client sent nothing after DATA; the fault was not exercised")
				}
				if l := logs.String(); !strings.Contains(l, "level=WARN") || !strings.Contains(l, "message accepted, but ending the session failed") {
					t.Fatalf("no warning about the failed session end in logs:\n%s", l)
				}
			case "temporary":
				if err == nil || workflow.IsTerminal(err) {
					t.Fatalf("451: got %v, want a retryable error", err)
				}
			case "permanent":
				if err == nil || !workflow.IsTerminal(err) {
					t.Fatalf("554: got %v, want a terminal error", err)
				}
			}
		})
	}
}
