// Package dbname holds the rules for the database names the daemon
// derives, which both the configuration (checking a prefix) and the
// channels set (deriving names) need. It imports nothing of the project,
// so config does not pull in the handler sets.
package dbname

import (
	"errors"
	"fmt"
	"strings"
)

const (
	// MaxLen is the longest database name CouchDB takes.
	MaxLen = 238
	// DerivedLen is what a channel name adds after its prefix: a slug of
	// up to 32 characters, a dash and 32 hex digits.
	DerivedLen = 32 + 1 + 32
)

// CheckPrefix reports whether prefix can start derived database names:
// a lowercase letter, then a-z 0-9 _$()+-/, short enough for DerivedLen
// more.
func CheckPrefix(prefix string) error {
	if prefix == "" {
		return errors.New("prefix is empty")
	}
	if prefix[0] < 'a' || prefix[0] > 'z' {
		return fmt.Errorf("prefix %q must start with a lowercase letter", prefix)
	}
	if len(prefix)+DerivedLen > MaxLen {
		return fmt.Errorf("prefix %q is too long: at most %d bytes", prefix, MaxLen-DerivedLen)
	}
	for i := range len(prefix) {
		if !NameByte(prefix[i]) {
			return fmt.Errorf("prefix %q may hold only a-z, 0-9 and _$()+-/", prefix)
		}
	}
	return nil
}

// NameByte reports whether c may appear in a database name (after its
// first letter).
func NameByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("_$()+-/", c) >= 0
}

// MaxSlug bounds a slug: a channel's id in its owner's control database,
// or a template's name.
const MaxSlug = 64

// CheckSlug reports whether s is a slug: 1 to MaxSlug of a-z 0-9 _ -,
// starting with a letter or digit.
func CheckSlug(s string) error {
	if s == "" || len(s) > MaxSlug {
		return fmt.Errorf("must be 1 to %d characters", MaxSlug)
	}
	for i := range len(s) {
		b := s[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || i > 0 && (b == '_' || b == '-')) {
			return fmt.Errorf("%q may hold only a-z, 0-9, _ and -, starting with a letter or digit", s)
		}
	}
	return nil
}

// CheckTemplateDB reports whether db can be a channel template: a user
// database name (a-z first, then a-z 0-9 _$()+-/, at most MaxLen), not a
// per-owner control database ("userctl-"), which would copy one owner's
// devices and requests into a channel.
func CheckTemplateDB(db string) error {
	if db == "" || len(db) > MaxLen || db[0] < 'a' || db[0] > 'z' {
		return fmt.Errorf("database %q must start with a-z and be at most %d bytes", db, MaxLen)
	}
	if strings.HasPrefix(db, "userctl-") {
		return fmt.Errorf("database %q is a control database", db)
	}
	for i := range len(db) {
		if !NameByte(db[i]) {
			return fmt.Errorf("database %q may hold only a-z, 0-9 and _$()+-/", db)
		}
	}
	return nil
}
