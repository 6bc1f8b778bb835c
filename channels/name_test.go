package channels_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/docstate/docstate/channels"
)

var validDBName = regexp.MustCompile(`^[a-z][a-z0-9_$()+/-]*$`)

// FuzzDBName: whatever a user types as a channel name, an accepted name
// derives a valid CouchDB database name, the same one every time, within
// the length limit, and a different name or owner derives another one.
func FuzzDBName(f *testing.F) {
	for _, s := range []string{"Family Photos ✨ / 2026!", "", "a", "../../_users", "_replicator", "ÄÖÜ", "x\x00y", strings.Repeat("z", 300), "-_-", "CON", "$()+/"} {
		f.Add("o@example.com", s)
	}
	f.Fuzz(func(t *testing.T, owner, name string) {
		if channels.CheckName(name) != nil {
			return
		}
		const prefix = "channel-"
		db := channels.DBName(prefix, owner, name)
		if !validDBName.MatchString(db) || len(db) > 238 || !strings.HasPrefix(db, prefix) {
			t.Fatalf("name %q -> invalid database name %q", name, db)
		}
		if again := channels.DBName(prefix, owner, name); again != db {
			t.Fatalf("not stable: %q then %q", db, again)
		}
		if other := channels.DBName(prefix, owner, name+"\u00e9"); other == db {
			t.Fatalf("%q and %q share database %q", name, name+"\u00e9", db)
		}
		if other := channels.DBName(prefix, owner+"x", name); other == db {
			t.Fatalf("owners %q and %q share database %q", owner, owner+"x", db)
		}
	})
}

func TestCheckPrefix(t *testing.T) {
	for _, ok := range []string{"channel-", "c", "app_ch$()+-/"} {
		if err := channels.CheckPrefix(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "Channel-", "1ch", "_ch", "ch ", "ch.", strings.Repeat("c", 200)} {
		if err := channels.CheckPrefix(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
