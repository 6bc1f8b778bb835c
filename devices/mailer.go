package devices

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/textproto"
	"strings"
	"time"

	"github.com/wneessen/go-mail"

	"github.com/docstate/docstate/workflow"
)

// Message is one email to send.
type Message struct {
	To      string
	From    string
	Subject string
	Text    string
	HTML    string
	// MessageID is the Message-ID without angle brackets
	// ("<hex>@<domain>" on the wire).
	MessageID string
	// Headers are extra headers, e.g. Auto-Submitted. Values must not
	// contain CR or LF.
	Headers map[string]string
}

// Mailer sends mail. Send returns nil once the server accepted the message;
// an error wrapped with workflow.Terminal when retrying cannot help (the
// server refused the message permanently); any other error is retried.
type Mailer interface {
	Send(ctx context.Context, m Message) error
}

// TLSPolicy says how the SMTP connection is protected.
type TLSPolicy string

const (
	// TLSMandatory requires STARTTLS (or implicit TLS) and fails otherwise.
	TLSMandatory TLSPolicy = "mandatory"
	// TLSOpportunistic uses STARTTLS when the server offers it.
	TLSOpportunistic TLSPolicy = "opportunistic"
	// TLSNone never uses TLS: loopback relays and tests only.
	TLSNone TLSPolicy = "none"
)

// SMTPConfig configures NewSMTPMailer.
type SMTPConfig struct {
	Host string
	// Port defaults to 587, or 465 with ImplicitTLS.
	Port int
	// TLS defaults to TLSMandatory.
	TLS TLSPolicy
	// ImplicitTLS connects with TLS from the first byte (SMTPS, port 465)
	// instead of STARTTLS.
	ImplicitTLS bool
	// Username and Password enable SMTP AUTH (PLAIN, or LOGIN when the
	// server offers only that). go-mail refuses to send them over an
	// unencrypted connection except to localhost.
	Username string
	Password string
	// HELO is the name sent in EHLO/HELO (default: "localhost" per go-mail).
	HELO string
	// Timeout bounds connecting and each SMTP command (default 30s).
	Timeout time.Duration
	// Logger receives the warnings of sends that succeeded with a
	// failure after the fact (see Send); default slog.Default(). Nothing
	// secret and no recipient address is logged.
	Logger *slog.Logger
}

// SMTPMailer sends mail over SMTP with go-mail, one connection per message:
// registration mail is rare and a held connection would go stale.
type SMTPMailer struct {
	cfg SMTPConfig
}

// NewSMTPMailer checks cfg and returns a mailer. It does not connect.
func NewSMTPMailer(cfg SMTPConfig) (*SMTPMailer, error) {
	if cfg.Host == "" {
		return nil, errors.New("smtp: host is required")
	}
	if cfg.TLS == "" {
		cfg.TLS = TLSMandatory
	}
	switch cfg.TLS {
	case TLSMandatory, TLSOpportunistic, TLSNone:
	default:
		return nil, fmt.Errorf("smtp: unknown TLS policy %q (want mandatory, opportunistic or none)", cfg.TLS)
	}
	if cfg.ImplicitTLS && cfg.TLS == TLSNone {
		return nil, errors.New("smtp: implicit TLS contradicts TLS policy none")
	}
	if cfg.Port == 0 {
		cfg.Port = 587
		if cfg.ImplicitTLS {
			cfg.Port = 465
		}
	}
	if cfg.Port < 1 || cfg.Port > 65535 {
		return nil, fmt.Errorf("smtp: port %d out of range", cfg.Port)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, errors.New("smtp: username and password must be set together")
	}
	if strings.ContainsAny(cfg.HELO, "\r\n ") {
		return nil, errors.New("smtp: HELO name must not contain spaces or line breaks")
	}
	// Build one client now so option errors surface at start, not per mail.
	if _, err := cfg.client(); err != nil {
		return nil, err
	}
	return &SMTPMailer{cfg: cfg}, nil
}

func (cfg SMTPConfig) client() (*mail.Client, error) {
	opts := []mail.Option{mail.WithPort(cfg.Port), mail.WithTimeout(cfg.Timeout)}
	switch cfg.TLS {
	case TLSMandatory:
		opts = append(opts, mail.WithTLSPolicy(mail.TLSMandatory))
	case TLSOpportunistic:
		opts = append(opts, mail.WithTLSPolicy(mail.TLSOpportunistic))
	case TLSNone:
		opts = append(opts, mail.WithTLSPolicy(mail.NoTLS))
	}
	if cfg.ImplicitTLS {
		opts = append(opts, mail.WithSSL())
	}
	if cfg.HELO != "" {
		opts = append(opts, mail.WithHELO(cfg.HELO))
	}
	if cfg.Username != "" {
		// Auto-discovery picks the strongest mechanism the server offers,
		// and refuses to send a password in clear. Without TLS only PLAIN
		// is used, which go-mail allows to localhost alone.
		auth := mail.SMTPAuthAutoDiscover
		if cfg.TLS == TLSNone {
			auth = mail.SMTPAuthPlain
		}
		opts = append(opts, mail.WithSMTPAuth(auth),
			mail.WithUsername(cfg.Username), mail.WithPassword(cfg.Password))
	}
	c, err := mail.NewClient(cfg.Host, opts...)
	if err != nil {
		return nil, fmt.Errorf("smtp client: %w", err)
	}
	return c, nil
}

// Dial connects to the server the way a send does (TCP or TLS, EHLO,
// STARTTLS as the TLS policy asks, AUTH with the credentials) and quits
// without sending: docstate check uses it so that a wrong SMTP setting is
// found before the first registration mail, not by it.
func (s *SMTPMailer) Dial(ctx context.Context) error {
	c, err := s.cfg.client()
	if err != nil {
		return err
	}
	if err := c.DialWithContext(ctx); err != nil {
		return fmt.Errorf("smtp %s: %w", net.JoinHostPort(s.cfg.Host, fmt.Sprint(s.cfg.Port)), err)
	}
	if err := c.Close(); err != nil {
		return fmt.Errorf("smtp QUIT: %w", err)
	}
	return nil
}

// Send delivers m to the SMTP server. See Mailer for the error contract and
// classifySMTP for which failures are permanent. Neither the error nor the
// log names the recipient: go-mail's error text lists the "affected
// recipient(s)" and SMTP replies often echo the address, so both are
// scrubbed (see redactor); the error chain is kept for errors.As.
func (s *SMTPMailer) Send(ctx context.Context, m Message) error {
	r := redactor{owner: m.To, keep: []string{m.From}}
	return r.err(s.send(ctx, m, r))
}

func (s *SMTPMailer) send(ctx context.Context, m Message, r redactor) error {
	msg := mail.NewMsg()
	if err := msg.From(m.From); err != nil {
		return workflow.Terminal(fmt.Errorf("from address: %w", err))
	}
	if err := msg.To(m.To); err != nil {
		return workflow.Terminal(fmt.Errorf("recipient address: %w", err))
	}
	msg.Subject(m.Subject)
	if m.MessageID != "" {
		msg.SetMessageIDWithValue(m.MessageID)
	}
	msg.SetDate()
	for k, v := range m.Headers {
		if strings.ContainsAny(k+v, "\r\n") || strings.ContainsAny(k, ": ") {
			return workflow.Terminal(fmt.Errorf("header %q is malformed", k))
		}
		msg.SetGenHeader(mail.Header(k), v)
	}
	msg.SetBodyString(mail.TypeTextPlain, m.Text)
	if m.HTML != "" {
		msg.AddAlternativeString(mail.TypeTextHTML, m.HTML)
	}
	c, err := s.cfg.client()
	if err != nil {
		return err
	}
	err = c.DialAndSendWithContext(ctx, msg)
	if err != nil && msg.IsDelivered() {
		// go-mail marks the message delivered once the relay answered 250
		// to the end of DATA; it then still sends RSET (after a NOOP) and
		// QUIT, and reports their failure, typically a dropped connection,
		// as the send's error. The relay has taken the message by then and
		// nothing can unsend it: reporting a failure would make the engine
		// retry and the recipient get the mail twice.
		s.cfg.Logger.Warn("smtp: message accepted, but ending the session failed",
			"message_id", m.MessageID, "response", r.text(msg.ServerResponse()), "err", r.err(err))
		return nil
	}
	if err != nil {
		return classifySMTP(err)
	}
	return nil
}

// classifySMTP decides whether a failed send may succeed later.
//
// A 5xx reply to MAIL FROM, RCPT TO or DATA is about this message (unknown
// recipient, refused content): permanent, so the device goes to its error
// state with the server's reason. Everything else is retried with the
// engine's backoff: 4xx replies, network errors and timeouts, and also a
// 5xx during connection setup (greeting, EHLO, STARTTLS, AUTH), which means
// the relay or our SMTP settings are broken, not this device: failing every
// registration for a wrong SMTP password would need an operator to re-drive
// each one, while retries resume by themselves once the setting is fixed.
func classifySMTP(err error) error {
	var sendErr *mail.SendError
	if errors.As(err, &sendErr) {
		if sendErr.IsTemp() {
			return fmt.Errorf("smtp: temporary failure: %w", err)
		}
		code := sendErr.ErrorCode()
		switch sendErr.Reason {
		case mail.ErrSMTPMailFrom, mail.ErrSMTPRcptTo, mail.ErrSMTPData, mail.ErrSMTPDataClose, mail.ErrWriteContent:
			if code >= 500 && code < 600 {
				return workflow.Terminal(fmt.Errorf("smtp: message refused permanently: %w", err))
			}
		}
		return fmt.Errorf("smtp: send failed: %w", err)
	}
	var tpErr *textproto.Error
	if errors.As(err, &tpErr) {
		return fmt.Errorf("smtp: server replied %d during connection setup (check smtp settings): %w", tpErr.Code, err)
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return fmt.Errorf("smtp: network: %w", err)
	}
	return fmt.Errorf("smtp: %w", err)
}
