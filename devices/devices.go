package devices

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/docstate/docstate/internal/identity"
	htmltemplate "html/template"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/workflow"
)

// Options configure the device handlers. Zero values take the defaults
// named per field.
type Options struct {
	// Client is an admin client: it writes _users.
	Client *kivik.Client
	// DB is the control database: the one the engine watches. The
	// per-address rate-limit documents live in it, and the confirmation
	// page writes into its device documents.
	DB *kivik.DB
	// Mailer sends the confirmation mail, normally an *SMTPMailer.
	Mailer Mailer
	// From is the sender address, a bare address such as
	// "docstate@example.com"; its domain also names the Message-IDs.
	From string
	// BaseURL is the public URL of the daemon's HTTP listener, e.g.
	// "https://docstate.example.com". Mail carries a confirmation link to
	// BaseURL + "/devices/confirm" when set, none when "".
	BaseURL string
	// Secret keys every HMAC: codes, link tokens, their stored hashes and
	// Message-IDs. At least 32 bytes, from crypto/rand, kept in a file
	// (see ReadSecretFile). Changing it invalidates codes in flight.
	Secret []byte

	// Pairing is PairingUsers (default: devices pair through their own
	// _users documents; the control database is the daemon's alone) or
	// PairingControl (devices write into a shared control database).
	Pairing string
	// PublicURL is the server's URL as devices reach it; in users mode an
	// active device's status carries <PublicURL>/<its control database>.
	PublicURL string

	// CodeTTL is how long a code is valid (default 15m).
	CodeTTL time.Duration
	// ResendInterval is the least time between two mails to one device
	// (default 1m).
	ResendInterval time.Duration
	// MaxAttempts is how many wrong codes lock a device, counted over its
	// whole registration, resends included (default 5).
	MaxAttempts int
	// AddressSends mails per AddressWindow to one address, over all its
	// devices (defaults 5 per 1h).
	AddressSends  int
	AddressWindow time.Duration
	// GlobalSends mails per GlobalWindow in all, to every address
	// (defaults 600 per 1h). It bounds what strangers can make the daemon
	// send to many addresses (AddressSends each) in all. Counted in
	// documents in DB (GlobalDocID), so it holds over every daemon that
	// shares the control database; they must agree on both values.
	GlobalSends  int
	GlobalWindow time.Duration
	// MaxIterations bounds the PBKDF2 iteration count a device may ask
	// for: the server pays it on every basic-auth request (default 1e6).
	MaxIterations int
	// MaxDocBytes bounds the size of a device document (default 16 KiB).
	MaxDocBytes int

	// HandlerTimeout and Lease are the handlers' engine settings; zero
	// takes the engine's defaults. Lease must exceed HandlerTimeout.
	HandlerTimeout time.Duration
	Lease          time.Duration

	// Templates render the mail; nil = built-in (DefaultTemplates).
	Templates *Templates
	// Logger defaults to slog.Default(). Nothing secret is ever logged.
	Logger *slog.Logger
}

// Devices holds the device registration handlers.
type Devices struct {
	opts   Options
	domain string // of From, for Message-IDs
	log    *slog.Logger
	page   *htmltemplate.Template // the confirmation page

	// verifications counts code checks, for tests and metrics: it must
	// never exceed MaxAttempts per device plus its one success.
	verifications atomic.Int64
	// onCheck, when set (by tests), is told each check's document and
	// the guess it checked, with the attempt number it was counted as.
	onCheck func(id string, p pendingCheck)
}

// MinSecretLen is the shortest Options.Secret accepted.
const MinSecretLen = 32

// New checks opts and returns the handlers.
func New(opts Options) (*Devices, error) {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&opts.CodeTTL, 15*time.Minute)
	def(&opts.ResendInterval, time.Minute)
	def(&opts.AddressWindow, time.Hour)
	def(&opts.GlobalWindow, time.Hour)
	if opts.MaxAttempts == 0 {
		opts.MaxAttempts = 5
	}
	if opts.AddressSends == 0 {
		opts.AddressSends = 5
	}
	if opts.GlobalSends == 0 {
		opts.GlobalSends = 600
	}
	if opts.MaxIterations == 0 {
		opts.MaxIterations = 1_000_000
	}
	if opts.MaxDocBytes == 0 {
		opts.MaxDocBytes = 16 << 10
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Pairing == "" {
		opts.Pairing = PairingUsers
	}
	var errs []error
	if opts.Pairing != PairingControl && opts.Pairing != PairingUsers {
		errs = append(errs, fmt.Errorf("pairing must be %q or %q, got %q", PairingControl, PairingUsers, opts.Pairing))
	}
	if opts.Client == nil {
		errs = append(errs, errors.New("client is required"))
	}
	if opts.DB == nil {
		errs = append(errs, errors.New("db is required"))
	}
	if opts.Mailer == nil {
		errs = append(errs, errors.New("mailer is required"))
	}
	if len(opts.Secret) < MinSecretLen {
		errs = append(errs, fmt.Errorf("secret must be at least %d bytes", MinSecretLen))
	}
	domain := ""
	if err := CheckEmail(opts.From); err != nil {
		errs = append(errs, fmt.Errorf("from: %w", err))
	} else {
		domain = opts.From[strings.LastIndexByte(opts.From, '@')+1:]
	}
	if opts.BaseURL != "" {
		u, err := url.Parse(opts.BaseURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			errs = append(errs, fmt.Errorf("base url %q must be an absolute http(s) URL without query, fragment or credentials", opts.BaseURL))
		}
	}
	if opts.CodeTTL < time.Second || opts.ResendInterval < 0 || opts.AddressWindow < time.Second || opts.GlobalWindow < time.Second {
		errs = append(errs, errors.New("code TTL, address window and global window must be at least 1s, resend interval not negative"))
	}
	if opts.MaxAttempts < 1 || opts.AddressSends < 1 || opts.GlobalSends < 1 || opts.MaxIterations < 1 || opts.MaxDocBytes < 1024 {
		errs = append(errs, errors.New("max attempts, address sends, global sends and max iterations must be positive, max doc bytes at least 1024"))
	}
	if opts.Lease > 0 && opts.HandlerTimeout > 0 && opts.Lease <= opts.HandlerTimeout {
		errs = append(errs, fmt.Errorf("lease %v must exceed handler timeout %v", opts.Lease, opts.HandlerTimeout))
	}
	if opts.Templates == nil {
		t, err := DefaultTemplates()
		if err != nil {
			errs = append(errs, fmt.Errorf("built-in templates: %w", err))
		}
		opts.Templates = t
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("devices: %w", err)
	}
	pageT, err := htmltemplate.New("page").Parse(pageHTML)
	if err != nil {
		return nil, fmt.Errorf("devices: confirmation page: %w", err)
	}
	opts.Secret = append([]byte(nil), opts.Secret...)
	return &Devices{opts: opts, domain: domain, log: opts.Logger, page: pageT}, nil
}

// Register registers the device handlers: new and confirming are Unsafe
// (they send mail and count attempts under the claim), active is Safe
// (revocation is idempotent).
func (d *Devices) Register(reg *workflow.Registry) error {
	specs := []workflow.Spec{
		{Type: DocType, State: StateNew, Mode: workflow.Unsafe, OnExpired: workflow.RetryExpired,
			Handler: d.publishing(d.redacting(d.handleNew))},
		{Type: DocType, State: StateConfirming, Mode: workflow.Unsafe, OnExpired: workflow.RetryExpired,
			Handler: d.publishing(d.redacting(d.handleConfirming)),
			// A side branch with fewer wrong codes must not win them back.
			MaxFields: []string{FieldFailedAttempts, FieldSends}},
		{Type: DocType, State: StateActive, Mode: workflow.Safe,
			Handler: d.redacting(d.handleActive)},
	}
	for _, s := range specs {
		s.Timeout, s.Lease = d.opts.HandlerTimeout, d.opts.Lease
		if err := reg.Register(s); err != nil {
			return fmt.Errorf("devices: %w", err)
		}
	}
	return nil
}

// mac is HMAC-SHA256 under the secret over a label and length-prefixed
// parts, so that no two different inputs share an encoding.
func (d *Devices) mac(label string, parts ...string) []byte {
	h := hmac.New(sha256.New, d.opts.Secret)
	var n [4]byte
	for _, p := range append([]string{"docstate-devices/" + label}, parts...) {
		binary.BigEndian.PutUint32(n[:], uint32(len(p)))
		h.Write(n[:])
		h.Write([]byte(p))
	}
	return h.Sum(nil)
}

// issue identifies one confirmation mail: the claim's idempotency key
// (stable across a takeover of an expired claim) plus what makes a key
// repeat impossible in practice (the send count, a re-drive's error time,
// the device's own random salt).
type issue struct {
	docID, claimKey, sends, redrive, owner, salt string
}

func (i issue) parts() []string {
	return []string{i.docID, i.claimKey, i.sends, i.redrive, i.owner, i.salt}
}

// codeLen is the number of digits of a code: 10^8 values, so with the
// default 5 attempts a guesser wins with probability 5e-8.
const codeLen = 8

// secrets derives the code, the link token and the Message-ID of an issue.
//
// They are derived from the secret (itself from crypto/rand) rather than
// drawn fresh, so that a resend after a crash between sending and recording
// is the same mail: same Message-ID and same code. A fresh code would make
// the first mail's code wrong while a receiver that drops the duplicate
// Message-ID shows only that first mail. HMAC-SHA256 under a random key is a
// PRF: without the secret the outputs are as unpredictable as random ones.
func (d *Devices) secrets(i issue) (code, token, messageID string) {
	c := d.mac("code", i.parts()...)
	n := binary.BigEndian.Uint64(c[:8]) % 100_000_000 // bias below 2^-36
	code = fmt.Sprintf("%0*d", codeLen, n)
	token = base64.RawURLEncoding.EncodeToString(d.mac("link", i.parts()...))
	messageID = hex.EncodeToString(d.mac("message-id", i.parts()...)[:16]) + "@" + d.domain
	return code, token, messageID
}

func (d *Devices) codeHash(docID, code string) string {
	return hex.EncodeToString(d.mac("code-hash", docID, code))
}

func (d *Devices) linkHash(docID, token string) string {
	return hex.EncodeToString(d.mac("link-hash", docID, token))
}

// linkProof is what the confirmation page writes into the document once
// the token checked out: it proves the daemon saw the token, without the
// token itself ever being stored.
func (d *Devices) linkProof(docID, linkHash string) string {
	return hex.EncodeToString(d.mac("link-ok", docID, linkHash))
}

// equalHex compares two hex strings in constant time.
func equalHex(a, b string) bool {
	return hmac.Equal([]byte(a), []byte(b))
}

// OwnerRole is the CouchDB role every device of owner gets, and the role a
// channel database's _security lists to admit the owner's devices
// (identity.OwnerRole: "owner-" and 40 hex digits of a hash of the
// lower-cased address, never the address itself).
func OwnerRole(owner string) string { return identity.OwnerRole(owner) }

// UserName is the CouchDB user name of a device: "device-" + 40 hex digits
// of SHA-256 over the device document id and the device's own salt, so that
// the same id in two control databases cannot name the same user unless it
// is the same device.
func UserName(docID, salt string) string {
	sum := sha256.Sum256([]byte("docstate-device-user\x00" + docID + "\x00" + salt))
	return "device-" + hex.EncodeToString(sum[:20])
}

// CheckEmail accepts a bare ASCII address as net/mail parses it: no display
// name, no comments, no spaces or control characters (header injection),
// at most 254 bytes (identity.CheckEmail).
func CheckEmail(s string) error { return identity.CheckEmail(s) }

func itoa(n int) string { return strconv.Itoa(n) }

// ReadSecretFile reads Options.Secret from path: the whole file, which must
// be a regular file of at least MinSecretLen and at most 4 KiB bytes, not
// readable by group or others. Errors never include the content.
func ReadSecretFile(path string) ([]byte, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("devices secret: %w", err)
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("devices secret: %s is not a regular file", path)
	}
	if info.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("devices secret: %s is accessible by group or others (mode %v); chmod 600 it", path, info.Mode().Perm())
	}
	if info.Size() < MinSecretLen || info.Size() > 4096 {
		return nil, fmt.Errorf("devices secret: %s must hold %d to 4096 bytes, has %d", path, MinSecretLen, info.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("devices secret: %w", err)
	}
	return b, nil
}
