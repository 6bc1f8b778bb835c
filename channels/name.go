package channels

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/docstate/docstate/internal/dbname"
)

// Database names in CouchDB start with a lowercase letter and hold only
// lowercase letters, digits and _$()+-/, at most 238 characters.
const (
	// maxNameLen bounds the channel name a user types (bytes).
	maxNameLen = 200
	// slugLen is how much of the name shows in the database name, to make
	// it recognisable; the hash makes it unique.
	slugLen = 32
	// hashLen is the hex digits of the hash in the database name: 128 bits.
	hashLen = 32
)

// The prefix check in package dbname counts on these lengths: this fails to
// compile (a negative constant converted to uint) when they drift apart.
const _ = uint(dbname.DerivedLen-(slugLen+1+hashLen)) + uint(slugLen+1+hashLen-dbname.DerivedLen)

// CheckPrefix reports whether prefix can start channel database names
// (dbname.CheckPrefix).
func CheckPrefix(prefix string) error { return dbname.CheckPrefix(prefix) }

func dbNameByte(c byte) bool { return dbname.NameByte(c) }

// CheckName reports whether a channel name as typed is acceptable: 1 to
// 200 bytes of valid UTF-8 without control characters. Anything else goes:
// the database name is derived, never taken from it.
func CheckName(name string) error {
	switch {
	case name == "":
		return errors.New("name is empty")
	case len(name) > maxNameLen:
		return fmt.Errorf("name is %d bytes, more than %d", len(name), maxNameLen)
	case !utf8.ValidString(name):
		return errors.New("name is not valid UTF-8")
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == 0x2028 || r == 0x2029 {
			return fmt.Errorf("name contains control character %U", r)
		}
	}
	return nil
}

// DBName derives the channel's database name from the owner and the name
// the user typed: prefix + a lowercase slug of the name (for people reading
// server listings) + "-" + 32 hex digits of SHA-256 over the lower-cased
// owner and the exact name. Whatever was typed, the result is a valid
// CouchDB database name; one owner's two channels of the same name get the
// same database, which the handler reports as a collision.
func DBName(prefix, owner, name string) string {
	var slug strings.Builder
	dash := false
	for _, r := range strings.ToLower(name) {
		if slug.Len() >= slugLen {
			break
		}
		if r < 0x80 && (r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			slug.WriteRune(r)
			dash = false
		} else if !dash && slug.Len() > 0 {
			slug.WriteByte('-')
			dash = true
		}
	}
	s := strings.TrimRight(slug.String(), "-")
	sum := sha256.Sum256([]byte("docstate-channel\x00" + strings.ToLower(owner) + "\x00" + name))
	if s == "" {
		return prefix + hex.EncodeToString(sum[:])[:hashLen]
	}
	return prefix + s + "-" + hex.EncodeToString(sum[:])[:hashLen]
}
