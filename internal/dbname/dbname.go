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
