package config

import (
	"errors"
	"fmt"
	"net"
	"net/mail"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// maxDatabaseName is CouchDB's limit on database name length.
const maxDatabaseName = 238

// Validate checks every rule and returns all problems at once, joined with
// errors.Join, one error per key, each starting with the dotted key:
//
//	engine.workers: must be between 1 and 1024, got 0
//
// It returns nil for a valid config. Errors never contain the password.
func (c Config) Validate() error {
	return errors.Join(c.validate()...)
}

// validate returns one error per key that breaks a rule, in key order.
func (c Config) validate() []error {
	var errs []error
	for _, k := range keyTable() {
		if k.check == nil {
			continue
		}
		if err := k.check(&c); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k.name, err))
		}
	}
	return errs
}

func intBetween(lo, hi int) func(*Config, int) error {
	return func(_ *Config, v int) error {
		if v < lo || v > hi {
			return fmt.Errorf("must be between %d and %d, got %d", lo, hi, v)
		}
		return nil
	}
}

func intAtLeast(lo int) func(*Config, int) error {
	return func(_ *Config, v int) error {
		if v < lo {
			return fmt.Errorf("must be at least %d, got %d", lo, v)
		}
		return nil
	}
}

func durationAtLeast(lo time.Duration) func(*Config, time.Duration) error {
	return func(_ *Config, v time.Duration) error {
		if v < lo {
			return fmt.Errorf("must be at least %s, got %s", formatDuration(lo), formatDuration(v))
		}
		return nil
	}
}

func durationPositive(_ *Config, v time.Duration) error {
	if v <= 0 {
		return fmt.Errorf("must be greater than 0, got %s", formatDuration(v))
	}
	return nil
}

func durationBetween(lo, hi time.Duration) func(*Config, time.Duration) error {
	return func(_ *Config, v time.Duration) error {
		if v < lo || v > hi {
			return fmt.Errorf("must be between %s and %s, got %s",
				formatDuration(lo), formatDuration(hi), formatDuration(v))
		}
		return nil
	}
}

func oneOf(allowed ...string) func(*Config, string) error {
	return func(_ *Config, v string) error {
		if !slices.Contains(allowed, v) {
			return fmt.Errorf("must be one of %s, got %q", strings.Join(allowed, ", "), v)
		}
		return nil
	}
}

// checkURL accepts an absolute http(s) URL with a host. It refuses user
// info because a URL is printed in logs and errors, where a password must
// never appear; for the same reason a value that may hold credentials is
// not quoted back.
func checkURL(_ *Config, v string) error {
	if v == "" {
		return errors.New("required")
	}
	shown := strconv.Quote(v)
	if strings.Contains(v, "@") {
		shown = "(value not shown: it may contain credentials)"
	}
	// Without this check "127.0.0.1:5984" fails inside url.Parse with the
	// unhelpful "first path segment in URL cannot contain colon".
	if !strings.Contains(v, "://") {
		return fmt.Errorf("must start with http:// or https://, got %s", shown)
	}
	u, err := url.Parse(v)
	if err != nil {
		var urlErr *url.Error
		if errors.As(err, &urlErr) {
			// url.Error quotes the whole URL; keep only the reason.
			err = urlErr.Err
		}
		if strings.Contains(v, "@") {
			return errors.New("not a valid URL (value not shown: it may contain credentials)")
		}
		return fmt.Errorf("not a valid URL %s: %w", shown, err)
	}
	if u.User != nil {
		return errors.New("must not contain credentials; " +
			"set couchdb.username and couchdb.password_file (or couchdb.password) instead")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("scheme must be http or https, got %q", u.Scheme)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("must include a host, got %s", shown)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		// The engine appends database paths and its own query parameters.
		return fmt.Errorf("must not have a query or fragment, got %s", shown)
	}
	return nil
}

func checkUsername(c *Config, v string) error {
	if v == "" && (c.CouchDB.Password != "" || c.CouchDB.PasswordFile != "") {
		// A password without a user is never sent, which would turn a
		// misconfiguration into confusing 401s at run time.
		return errors.New("required when couchdb.password or couchdb.password_file is set")
	}
	if strings.Contains(v, ":") {
		return errors.New("must not contain ':', which HTTP basic auth cannot carry")
	}
	return nil
}

func checkPasswordFile(c *Config, v string) error {
	if v != "" && c.CouchDB.Password != "" {
		return errors.New("cannot be combined with couchdb.password; set only one")
	}
	return nil
}

// checkDatabase applies CouchDB's rule for database names, so a typo is
// reported at start rather than as an HTTP 400 from the feed.
func checkDatabase(_ *Config, v string) error {
	if v == "" {
		return errors.New("required")
	}
	if len(v) > maxDatabaseName {
		return fmt.Errorf("must be at most %d characters, got %d", maxDatabaseName, len(v))
	}
	for i := range len(v) {
		b := v[i]
		lower := b >= 'a' && b <= 'z'
		ok := lower
		if i > 0 {
			ok = lower || b >= '0' && b <= '9' || strings.IndexByte("_$()+/-", b) >= 0
		}
		if !ok {
			return fmt.Errorf("must match ^[a-z][a-z0-9_$()+/-]*$, got %q", v)
		}
	}
	return nil
}

func checkHandlerTimeout(c *Config, v time.Duration) error {
	if v <= 0 {
		return fmt.Errorf("must be greater than 0, got %s", formatDuration(v))
	}
	// A handler still running when its lease ends could be claimed and run
	// a second time by another worker.
	if v >= c.Engine.Lease {
		return fmt.Errorf("must be less than engine.lease (%s), got %s",
			formatDuration(c.Engine.Lease), formatDuration(v))
	}
	return nil
}

func checkRetryBase(c *Config, v time.Duration) error {
	if v <= 0 {
		// A zero base would retry failing documents in a tight loop.
		return fmt.Errorf("must be greater than 0, got %s", formatDuration(v))
	}
	if v > c.Engine.RetryMax {
		return fmt.Errorf("must be at most engine.retry_max (%s), got %s",
			formatDuration(c.Engine.RetryMax), formatDuration(v))
	}
	return nil
}

func checkMaxPending(c *Config, v int) error {
	// Below one batch the feed would pause before a batch could be held.
	if v < c.Engine.FeedBatch {
		return fmt.Errorf("must be at least engine.feed_batch (%d), got %d", c.Engine.FeedBatch, v)
	}
	return nil
}

func checkMaxPendingBytes(c *Config, v int) error {
	// Feed bodies may take half; a read of the largest document must fit
	// in the other half.
	if v < 2*c.Engine.MaxDocBytes {
		return fmt.Errorf("must be at least twice engine.max_doc_bytes (%d), got %d", 2*c.Engine.MaxDocBytes, v)
	}
	return nil
}

// checkListen accepts "", or host:port with a numeric port; the host may
// be empty to listen on every interface. Port 0 (any free port) is allowed
// for tests.
func checkListen(_ *Config, v string) error {
	if v == "" {
		return nil
	}
	_, port, err := net.SplitHostPort(v)
	if err != nil {
		return fmt.Errorf("must be host:port such as \"127.0.0.1:9090\" or \":9090\", got %q", v)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port must be a number between 0 and 65535, got %q", port)
	}
	return nil
}

// checkEngineName keeps the name usable inside a _local document id and a
// log line: short, printable, no slashes.
func checkEngineName(_ *Config, n string) error {
	if n == "" || len(n) > 64 {
		return fmt.Errorf("must be 1 to 64 characters, got %d", len(n))
	}
	for _, r := range n {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("must use only a-z, 0-9, '-', '_' and '.', got %q", n)
		}
	}
	return nil
}

func checkSMTPHost(c *Config, v string) error {
	if v == "" && c.Devices.Enabled {
		return errors.New("required when devices.enabled is true")
	}
	if strings.ContainsAny(v, " /:@\r\n") {
		return fmt.Errorf("must be a host name or IP address without port, got %q", v)
	}
	return nil
}

func checkImplicitTLS(c *Config, v bool) error {
	if v && c.SMTP.TLS == "none" {
		return errors.New("cannot be combined with smtp.tls none")
	}
	return nil
}

func checkSMTPUsername(c *Config, v string) error {
	if v == "" && (c.SMTP.Password != "" || c.SMTP.PasswordFile != "") {
		return errors.New("required when smtp.password or smtp.password_file is set")
	}
	if strings.ContainsAny(v, "\r\n\x00") {
		return errors.New("must not contain line breaks or NUL")
	}
	return nil
}

func checkSMTPPasswordFile(c *Config, v string) error {
	if v != "" && c.SMTP.Password != "" {
		return errors.New("cannot be combined with smtp.password; set only one")
	}
	return nil
}

func checkHELO(_ *Config, v string) error {
	if strings.ContainsAny(v, " \t\r\n") {
		return fmt.Errorf("must not contain spaces or line breaks, got %q", v)
	}
	return nil
}

// checkSMTPFrom wants a bare address: the From header and the Message-ID
// domain are built from it.
func checkSMTPFrom(c *Config, v string) error {
	if v == "" {
		if c.Devices.Enabled {
			return errors.New("required when devices.enabled is true")
		}
		return nil
	}
	a, err := mail.ParseAddress(v)
	if err != nil || a.Address != v || strings.ContainsAny(v, " \r\n") {
		return fmt.Errorf("must be a bare email address such as docstate@example.com, got %q", v)
	}
	return nil
}

func checkSecretFile(c *Config, v string) error {
	if v == "" && c.Devices.Enabled {
		return errors.New("required when devices.enabled is true")
	}
	return nil
}

// checkConfirmBaseURL is checkBaseURL for devices.base_url, whose links
// lead to the confirmation page: that is served on http.public_listen only.
func checkConfirmBaseURL(c *Config, v string) error {
	if err := checkBaseURL(c, v); err != nil {
		return err
	}
	if v != "" && c.Devices.Enabled && c.HTTP.PublicListen == "" {
		return errors.New("needs http.public_listen: the confirmation page its links lead to is served there, not on the private http.listen")
	}
	return nil
}

func checkBaseURL(_ *Config, v string) error {
	if v == "" {
		return nil
	}
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("must be an absolute http(s) URL without credentials, query or fragment, got %q", v)
	}
	return nil
}

// checkPatterns wants valid globs, and the single-database mode for the
// built-in sets, which keep their documents in the one control database.
func checkPatterns(c *Config, v string) error {
	if v == "" {
		return nil
	}
	for _, p := range c.Databases.PatternList() {
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("%q is not a valid glob: %w", p, err)
		}
	}
	if len(c.Databases.PatternList()) == 0 {
		return fmt.Errorf("no pattern in %q", v)
	}
	if c.Devices.Enabled || c.Channels.Enabled {
		return errors.New("devices.enabled and channels.enabled need the single-database mode: leave databases.patterns empty")
	}
	return nil
}
