package couch

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/go-kivik/kivik/v4/couchdb"
)

// Options describe how to reach a CouchDB server.
type Options struct {
	// URL is the server root, e.g. http://127.0.0.1:5984. Credentials in the
	// URL are refused: they leak into logs and process listings.
	URL string
	// Username and Password authenticate with HTTP basic auth. Both empty
	// means anonymous access.
	Username string
	Password string
	// MaxConnsPerHost bounds open connections to the server (0 = 64).
	MaxConnsPerHost int
	// UserAgent is appended to kivik's User-Agent header.
	UserAgent string
}

// NewClient returns a kivik client for the server in opts.
func NewClient(opts Options) (*kivik.Client, error) {
	u, err := url.Parse(opts.URL)
	if err != nil {
		return nil, fmt.Errorf("couchdb url %q: %w", opts.URL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("couchdb url %q: scheme must be http or https", opts.URL)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("couchdb url %q: no host", opts.URL)
	}
	if u.User != nil {
		return nil, fmt.Errorf("couchdb url: credentials in the url are not allowed; use username and password settings")
	}
	conns := opts.MaxConnsPerHost
	if conns <= 0 {
		conns = 64
	}
	transport := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          conns,
		MaxIdleConnsPerHost:   conns,
		MaxConnsPerHost:       conns,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		// Streamed feeds must not wait behind a gzip buffer.
		DisableCompression: true,
	}
	kopts := []kivik.Option{
		// limitTransport enforces WithBodyLimit on the requests that ask;
		// activityTransport notes every byte the server sends (heartbeats);
		// statusTransport records whether a write was 201 or 202 (cluster
		// claims, see workflow/prove.go); revsTransport serves OpenAllRevs.
		couchdb.OptionHTTPClient(&http.Client{Transport: revsTransport{statusTransport{activityTransport{&limitTransport{base: transport}}}}}),
		couchdb.OptionNoRequestCompression(),
	}
	if opts.UserAgent != "" {
		kopts = append(kopts, couchdb.OptionUserAgent(opts.UserAgent))
	}
	if opts.Username != "" || opts.Password != "" {
		kopts = append(kopts, couchdb.BasicAuth(opts.Username, opts.Password))
	}
	client, err := kivik.New("couch", u.String(), kopts...)
	if err != nil {
		return nil, fmt.Errorf("couchdb client: %w", err)
	}
	return client, nil
}

// IsConflict reports whether err is a 409 document update conflict.
func IsConflict(err error) bool {
	return err != nil && !isContextErr(err) && kivik.HTTPStatus(err) == http.StatusConflict
}

// IsNotFound reports whether err is a 404.
func IsNotFound(err error) bool {
	return err != nil && !isContextErr(err) && kivik.HTTPStatus(err) == http.StatusNotFound
}

// IsPreconditionFailed reports whether err is a 412 (e.g. database exists).
func IsPreconditionFailed(err error) bool {
	return err != nil && !isContextErr(err) && kivik.HTTPStatus(err) == http.StatusPreconditionFailed
}

// IsUnauthorized reports whether err is a 401 or 403. PouchDB Server answers
// 401 where CouchDB 3 answers 403 for an authenticated non-member.
func IsUnauthorized(err error) bool {
	if err == nil || isContextErr(err) {
		return false
	}
	s := kivik.HTTPStatus(err)
	return s == http.StatusUnauthorized || s == http.StatusForbidden
}

// IsTransient reports whether a request may succeed if repeated: network
// errors, timeouts and 5xx answers. 4xx answers are the caller's fault and
// repeating them changes nothing.
func IsTransient(err error) bool {
	if err == nil {
		return false
	}
	if isContextErr(err) {
		return false
	}
	s := kivik.HTTPStatus(err)
	return s == 0 || s >= 500 || s == http.StatusTooManyRequests || s == http.StatusRequestTimeout
}

// isContextErr is checked first because kivik reports a cancelled context as
// HTTP status 502.
func isContextErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
