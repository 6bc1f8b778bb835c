package identity_test

import (
	"testing"

	"github.com/docstate/docstate/internal/identity"
)

func TestRolesAndControlDatabasesDeriveFromTheAddress(t *testing.T) {
	role := identity.OwnerRole("Alice@Example.com")
	if role != identity.OwnerRole("alice@example.com") || len(role) != len("owner-")+40 {
		t.Fatalf("role %q", role)
	}
	db := identity.UserDBName("alice@example.com")
	if got, ok := identity.RoleOfUserDB(db); !ok || got != role || identity.UserDBOfRole(role) != db {
		t.Fatalf("db %q role %q %v", db, got, ok)
	}
	for _, bad := range []string{"userctl-", "userctl-XYZ", "other-" + role[6:], identity.UserDBPrefix + role[6:] + "0"} {
		if _, ok := identity.RoleOfUserDB(bad); ok {
			t.Errorf("%q taken for a control database", bad)
		}
	}
	if identity.UserDBOfRole("admin") != "" {
		t.Error("a foreign role has a control database")
	}
	for _, bad := range []string{"", "a b@c.d", "Alice <a@b.c>", "a@b.c\r\nBcc: x@y.z", "noat"} {
		if identity.CheckEmail(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if err := identity.CheckEmail("alice@example.com"); err != nil {
		t.Error(err)
	}
}
