package identity

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/mail"
	"strings"
)

// The device documents' contract, as the devices set writes them and the
// channels set reads them.
const (
	// DeviceType is the type of a device's trusted document in the shared
	// control database.
	DeviceType = "device"
	// StateActive is the state of a paired device (its trusted document
	// and its DeviceInfoType entry).
	StateActive = "active"
	// DeviceInfoType is the type of a device's entry in its owner's
	// control database.
	DeviceInfoType = "device_info"
	// FieldOwnerRole, FieldCouchUser and FieldPairingMode are fields of a
	// trusted device document: the owner's role, the device's CouchDB user
	// name, and PairingUsers for devices paired through their own users.
	FieldOwnerRole   = "owner_role"
	FieldCouchUser   = "couch_user"
	FieldPairingMode = "pairing_mode"
	PairingUsers     = "users"

	// UserDBPrefix starts the name of every per-owner control database.
	UserDBPrefix = "userctl-"

	rolePrefix  = "owner-"
	maxEmailLen = 254
)

// OwnerRole is the CouchDB role every device of owner gets, and the role a
// channel database's _security lists to admit the owner's devices. It is
// "owner-" + the first 40 hex digits of SHA-256 over a fixed prefix and the
// lower-cased address: stable (no key to rotate), and not the address
// itself, which would show in every _security object. It is unkeyed, so
// someone who can read a _security object and guesses an address can
// confirm the guess; it carries no access by itself.
func OwnerRole(owner string) string {
	sum := sha256.Sum256([]byte("docstate-owner\x00" + strings.ToLower(owner)))
	return rolePrefix + hex.EncodeToString(sum[:20])
}

// UserDBName is owner's private control database: UserDBPrefix and the 40
// hex digits of OwnerRole, so the address is in no database name.
func UserDBName(owner string) string { return UserDBOfRole(OwnerRole(owner)) }

// UserDBOfRole is the control database of the owner whose role is role,
// "" when role is not an owner role.
func UserDBOfRole(role string) string {
	hexPart, ok := strings.CutPrefix(role, rolePrefix)
	if !ok || !isHex40(hexPart) {
		return ""
	}
	return UserDBPrefix + hexPart
}

// RoleOfUserDB is the owner role whose control database is name.
func RoleOfUserDB(name string) (string, bool) {
	hexPart, ok := strings.CutPrefix(name, UserDBPrefix)
	if !ok || !isHex40(hexPart) {
		return "", false
	}
	return rolePrefix + hexPart, true
}

func isHex40(s string) bool {
	if len(s) != 40 {
		return false
	}
	for i := range len(s) {
		if !(s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'f') {
			return false
		}
	}
	return true
}

// CheckEmail accepts a bare ASCII address as net/mail parses it: no display
// name, no comments, no spaces or control characters (header injection),
// at most 254 bytes.
func CheckEmail(s string) error {
	if s == "" {
		return errors.New("is empty")
	}
	if len(s) > maxEmailLen {
		return fmt.Errorf("is %d bytes, more than %d", len(s), maxEmailLen)
	}
	for i := range len(s) {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return fmt.Errorf("contains a control, space or non-ASCII character at byte %d", i)
		}
	}
	a, err := mail.ParseAddress(s)
	if err != nil {
		return fmt.Errorf("is not an email address: %w", err)
	}
	if a.Name != "" || a.Address != s {
		return errors.New("must be a bare address, without name or angle brackets")
	}
	at := strings.LastIndexByte(s, '@')
	if at < 1 || at > 64 || at == len(s)-1 {
		return errors.New("is not an email address: bad local part or domain")
	}
	return nil
}
