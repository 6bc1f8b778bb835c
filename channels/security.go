package channels

import (
	"context"
	"fmt"
	"slices"

	kivik "github.com/go-kivik/kivik/v4"
)

// adminOnly is the member role of an archived channel: no user has it
// (server admins pass _security anyway). An empty members list would make
// the database public in CouchDB.
const adminOnly = "_admin"

// ensureSecurity makes the database's _security admit exactly roles as
// members (none: server admins only), with no database admins, and reads
// it back to prove it took.
func ensureSecurity(ctx context.Context, db *kivik.DB, roles []string) error {
	if len(roles) == 0 {
		roles = []string{adminOnly}
	}
	want := &kivik.Security{
		Admins:  kivik.Members{Names: []string{}, Roles: []string{}},
		Members: kivik.Members{Names: []string{}, Roles: roles},
	}
	cur, err := db.Security(ctx)
	if err != nil {
		return fmt.Errorf("read _security of %s: %w", db.Name(), err)
	}
	if sameSecurity(cur, want) {
		return nil
	}
	if err := db.SetSecurity(ctx, want); err != nil {
		return fmt.Errorf("set _security of %s: %w", db.Name(), err)
	}
	got, err := db.Security(ctx)
	if err != nil {
		return fmt.Errorf("read back _security of %s: %w", db.Name(), err)
	}
	if !sameSecurity(got, want) {
		return fmt.Errorf("_security of %s did not take: members %v, want %v", db.Name(), got.Members, want.Members)
	}
	return nil
}

func sameSecurity(a, b *kivik.Security) bool {
	set := func(s []string) []string {
		s = slices.Clone(s)
		slices.Sort(s)
		return slices.Compact(s)
	}
	return a != nil && b != nil &&
		slices.Equal(set(a.Members.Roles), set(b.Members.Roles)) && slices.Equal(set(a.Members.Names), set(b.Members.Names)) &&
		slices.Equal(set(a.Admins.Roles), set(b.Admins.Roles)) && slices.Equal(set(a.Admins.Names), set(b.Admins.Names))
}
