package couch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	internal "github.com/go-kivik/kivik/v4/int/errors"
)

func TestNewClientRefusesBadURLs(t *testing.T) {
	for url, want := range map[string]string{
		"ftp://x:5984":              "scheme must be http or https",
		"http://":                   "no host",
		"http://admin:pw@127.0.0.1": "credentials in the url are not allowed",
		"://bad":                    "couchdb url",
	} {
		_, err := NewClient(Options{URL: url})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("NewClient(%q) = %v, want error containing %q", url, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "pw@") {
			t.Errorf("error repeats the password: %v", err)
		}
	}
	if _, err := NewClient(Options{URL: "http://127.0.0.1:5984", Username: "u", Password: "p"}); err != nil {
		t.Fatalf("valid options refused: %v", err)
	}
}

func TestErrorClasses(t *testing.T) {
	status := func(code int) error { return &internal.Error{Status: code, Err: errors.New(http.StatusText(code))} }
	// kivik reports a cancelled context as 502; it must not look transient.
	cancelled := fmt.Errorf("get: %w", &internal.Error{Status: http.StatusBadGateway, Err: context.Canceled})
	tests := []struct {
		err                                                 error
		conflict, notFound, exists, unauthorized, transient bool
	}{
		{err: status(409), conflict: true},
		{err: status(404), notFound: true},
		{err: status(412), exists: true},
		{err: status(401), unauthorized: true},
		{err: status(403), unauthorized: true},
		{err: status(500), transient: true},
		{err: status(503), transient: true},
		{err: status(429), transient: true},
		{err: errors.New("connection refused"), transient: true},
		{err: status(400)},
		{err: status(413)},
		{err: cancelled},
		{err: nil},
	}
	for _, tt := range tests {
		got := [5]bool{IsConflict(tt.err), IsNotFound(tt.err), IsPreconditionFailed(tt.err), IsUnauthorized(tt.err), IsTransient(tt.err)}
		want := [5]bool{tt.conflict, tt.notFound, tt.exists, tt.unauthorized, tt.transient}
		if got != want {
			t.Errorf("%v: got %v, want %v (conflict, notfound, exists, unauthorized, transient)", tt.err, got, want)
		}
	}
}
