package devices

import (
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/docstate/docstate/internal/identity"
	"unicode"
	"unicode/utf8"

	"github.com/docstate/docstate/workflow"
)

// Document type and states.
const (
	DocType         = identity.DeviceType
	StateNew        = "new"
	StateConfirming = "confirming"
	StateActive     = identity.StateActive
	StateExpired    = "expired"
	StateLocked     = "locked"
	StateRevoked    = "revoked"
)

// Fields the device writes.
const (
	FieldOwner           = "owner"
	FieldDeviceName      = "device_name"
	FieldCredentials     = "credentials"
	FieldConfirmAttempt  = "confirm_attempt"
	FieldResendRequested = "resend_requested"
	FieldRevokeRequested = "revoke_requested"
)

// Fields docstate writes.
const (
	FieldCodeHash         = "code_hash"
	FieldLinkHash         = "link_hash"
	FieldCodeExpires      = "code_expires"
	FieldSends            = "sends"
	FieldLastSentAt       = "last_sent_at"
	FieldMessageID        = "message_id"
	FieldFailedAttempts   = "failed_attempts"
	FieldLastAttemptError = "last_attempt_error"
	FieldResendDenied     = "resend_denied"
	FieldSendDelayed      = "send_delayed"
	FieldConfirmLink      = "confirm_link"
	FieldPendingCheck     = "pending_check"
	FieldReason           = "reason"
	FieldCouchUser        = identity.FieldCouchUser
	FieldOwnerRole        = identity.FieldOwnerRole
	FieldActivatedAt      = "activated_at"
	FieldRevokedAt        = "revoked_at"
)

const (
	maxDeviceNameRunes = 64
	maxAttemptLen      = 64
	minSaltHex         = 32 // 128 bits
	maxSaltHex         = 128
	derivedKeyHex      = 40 // PBKDF2-HMAC-SHA1, 20 bytes
)

// Credentials is the device's request for CouchDB credentials: the PBKDF2
// hash of a password only the device knows, in the form CouchDB's _users
// stores it.
type Credentials struct {
	PasswordScheme string `json:"password_scheme"`
	DerivedKey     string `json:"derived_key"`
	Salt           string `json:"salt"`
	Iterations     int    `json:"iterations"`
}

// request is a validated device registration.
type request struct {
	owner      string
	deviceName string
	creds      Credentials
}

// parseRequest validates what the device wrote. Every failure is terminal
// (the device must write a new document) and names the field.
func (d *Devices) parseRequest(doc *workflow.Doc) (request, error) {
	invalid := func(format string, args ...any) (request, error) {
		return request{}, workflow.Terminal(fmt.Errorf("invalid device document: "+format, args...))
	}
	if n := len(doc.Raw()); n > d.opts.MaxDocBytes {
		return invalid("document is %d bytes, more than the limit of %d", n, d.opts.MaxDocBytes)
	}
	var r request
	if err := stringField(doc, FieldOwner, &r.owner); err != nil {
		return invalid("%v", err)
	}
	if err := CheckEmail(r.owner); err != nil {
		return invalid("%s %v", FieldOwner, err)
	}
	if err := stringField(doc, FieldDeviceName, &r.deviceName); err != nil {
		return invalid("%v", err)
	}
	if err := checkDeviceName(r.deviceName); err != nil {
		return invalid("%s %v", FieldDeviceName, err)
	}
	if d.usersMode(doc) {
		// The device signed itself up with its own password: no
		// credentials pass through the daemon. Its user name, unique on
		// the server, takes the salt's place in what a code derives from.
		var user string
		if err := stringField(doc, FieldCouchUser, &user); err != nil {
			return invalid("%v", err)
		}
		if err := checkUserName(user); err != nil {
			return invalid("%s %v", FieldCouchUser, err)
		}
		r.creds.Salt = "user:" + user
		return r, nil
	}
	ok, err := doc.Field(FieldCredentials, &r.creds)
	if err != nil {
		return invalid("%s must be an object {password_scheme, derived_key, salt, iterations}", FieldCredentials)
	}
	if !ok {
		return invalid("%s is missing", FieldCredentials)
	}
	if err := d.checkCredentials(r.creds); err != nil {
		return invalid("%s: %v", FieldCredentials, err)
	}
	return r, nil
}

func stringField(doc *workflow.Doc, name string, v *string) error {
	ok, err := doc.Field(name, v)
	if err != nil {
		return fmt.Errorf("%s must be a string", name)
	}
	if !ok {
		return fmt.Errorf("%s is missing", name)
	}
	return nil
}

// checkDeviceName accepts 1 to 64 printable characters. Line and paragraph
// separators and every control character are refused: the name goes into
// a mail body, and nowhere near a header, but a name that could break a
// header if a template put it there has no business being a device name.
func checkDeviceName(s string) error {
	if s == "" {
		return errors.New("is empty")
	}
	if !utf8.ValidString(s) {
		return errors.New("is not valid UTF-8")
	}
	if n := utf8.RuneCountInString(s); n > maxDeviceNameRunes {
		return fmt.Errorf("is %d characters, more than %d", n, maxDeviceNameRunes)
	}
	for _, r := range s {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' || !unicode.IsPrint(r) && r != ' ' {
			return fmt.Errorf("contains the non-printable character %U", r)
		}
	}
	return nil
}

func (d *Devices) checkCredentials(c Credentials) error {
	if c.PasswordScheme != "pbkdf2" {
		return fmt.Errorf("password_scheme must be \"pbkdf2\", got %q", truncate(c.PasswordScheme, 20))
	}
	if len(c.DerivedKey) != derivedKeyHex || !isLowerHex(c.DerivedKey) {
		return fmt.Errorf("derived_key must be %d lower-case hex digits (PBKDF2-HMAC-SHA1, 20 bytes)", derivedKeyHex)
	}
	if len(c.Salt) < minSaltHex || len(c.Salt) > maxSaltHex || !isLowerHex(c.Salt) {
		return fmt.Errorf("salt must be %d to %d lower-case hex digits", minSaltHex, maxSaltHex)
	}
	if c.Iterations < 1 || c.Iterations > d.opts.MaxIterations {
		return fmt.Errorf("iterations must be between 1 and %d, got %d", d.opts.MaxIterations, c.Iterations)
	}
	return nil
}

func isLowerHex(s string) bool {
	if _, err := hex.DecodeString(s); err != nil {
		return false
	}
	for i := range len(s) {
		if s[i] >= 'A' && s[i] <= 'F' {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
