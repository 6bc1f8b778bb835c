package config

import (
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/docstate/docstate/internal/dbname"
)

// redactedValue replaces secrets in Redacted output.
const redactedValue = "[redacted]"

// Config is the complete daemon configuration. The yaml tags match the
// dotted keys listed by Keys, so yaml.Marshal(cfg.Redacted()) prints a file
// that Load accepts again.
type Config struct {
	CouchDB   CouchDB   `yaml:"couchdb"`
	Database  string    `yaml:"database"`
	Engine    Engine    `yaml:"engine"`
	Log       Log       `yaml:"log"`
	HTTP      HTTP      `yaml:"http"`
	SMTP      SMTP      `yaml:"smtp"`
	Devices   Devices   `yaml:"devices"`
	Channels  Channels  `yaml:"channels"`
	Databases Databases `yaml:"databases"`
}

// Databases configures many-database mode (supervisor.Supervisor): with
// Patterns set, every database whose name matches is watched instead of
// Database.
type Databases struct {
	// Patterns is a comma-separated list of globs, e.g. "userctl-*".
	Patterns          string        `yaml:"patterns"`
	MaxOpen           int           `yaml:"max_open"`
	DiscoveryInterval time.Duration `yaml:"discovery_interval"`
	IdleStop          time.Duration `yaml:"idle_stop"`
	Turn              time.Duration `yaml:"turn"`
	// Shard of Shards: this daemon watches the databases whose name hashes
	// to Shard modulo Shards (0 or 1 shards: all).
	Shard  int `yaml:"shard"`
	Shards int `yaml:"shards"`
}

// PatternList returns Patterns split at commas, blanks trimmed.
func (d Databases) PatternList() []string {
	var out []string
	for _, p := range strings.Split(d.Patterns, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Channels configures per-user channels (package channels).
type Channels struct {
	Enabled           bool          `yaml:"enabled"`
	Prefix            string        `yaml:"prefix"`
	PublicURL         string        `yaml:"public_url"`
	OnDelete          string        `yaml:"on_delete"`
	ReconcileInterval time.Duration `yaml:"reconcile_interval"`
	MaxMembers        int           `yaml:"max_members"`
	// Templates is a comma-separated list of name=database pairs: the
	// databases a channel asked for by replication may be seeded from.
	Templates string `yaml:"templates"`
}

// TemplateMap returns Templates as name → database; the second result is
// the first malformed entry's error.
func (c Channels) TemplateMap() (map[string]string, error) {
	out := map[string]string{}
	for _, pair := range strings.Split(c.Templates, ",") {
		if pair = strings.TrimSpace(pair); pair == "" {
			continue
		}
		name, db, ok := strings.Cut(pair, "=")
		name, db = strings.TrimSpace(name), strings.TrimSpace(db)
		if !ok {
			return nil, fmt.Errorf("%q must be name=database", pair)
		}
		if err := dbname.CheckSlug(name); err != nil {
			return nil, fmt.Errorf("%q: template name %w", pair, err)
		}
		if err := dbname.CheckTemplateDB(db); err != nil {
			return nil, fmt.Errorf("%q: %w", pair, err)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("template %q is listed twice", name)
		}
		out[name] = db
	}
	return out, nil
}

// SMTP is the relay that sends device confirmation mail.
type SMTP struct {
	Host        string `yaml:"host"`
	Port        int    `yaml:"port"`
	TLS         string `yaml:"tls"`
	ImplicitTLS bool   `yaml:"implicit_tls"`
	Username    string `yaml:"username"`
	// Password is a secret, like CouchDB.Password; PasswordFile is read by
	// Load into it.
	Password     string        `yaml:"password"`
	PasswordFile string        `yaml:"password_file"`
	HELO         string        `yaml:"helo"`
	Timeout      time.Duration `yaml:"timeout"`
	From         string        `yaml:"from"`
}

// Devices configures device registration (package devices).
type Devices struct {
	Enabled bool `yaml:"enabled"`
	// SecretFile holds the HMAC key for codes and links (at least 32
	// bytes); the daemon reads it with devices.ReadSecretFile.
	SecretFile     string        `yaml:"secret_file"`
	BaseURL        string        `yaml:"base_url"`
	CodeTTL        time.Duration `yaml:"code_ttl"`
	ResendInterval time.Duration `yaml:"resend_interval"`
	MaxAttempts    int           `yaml:"max_attempts"`
	AddressSends   int           `yaml:"address_sends"`
	AddressWindow  time.Duration `yaml:"address_window"`
	GlobalSends    int           `yaml:"global_sends"`
	GlobalWindow   time.Duration `yaml:"global_window"`
	MaxIterations  int           `yaml:"max_iterations"`
	TemplatesDir   string        `yaml:"templates_dir"`
	// Pairing is "control" (devices write into the control database) or
	// "users" (devices pair through their own _users documents).
	Pairing      string        `yaml:"pairing"`
	PublicURL    string        `yaml:"public_url"`
	HealInterval time.Duration `yaml:"heal_interval"`
}

// CouchDB is how to reach the CouchDB server.
type CouchDB struct {
	// URL is the server's base URL, without credentials.
	URL      string `yaml:"url"`
	Username string `yaml:"username"`
	// Password is a secret: it never appears in errors or in Redacted.
	Password string `yaml:"password"`
	// PasswordFile is read by Load into Password; Load returns it empty so
	// that the result validates again and is self-contained.
	PasswordFile   string `yaml:"password_file"`
	MaxConnections int    `yaml:"max_connections"`
}

// Engine tunes the document state-machine engine and its changes feed.
type Engine struct {
	Name               string        `yaml:"name"`
	Workers            int           `yaml:"workers"`
	BatchSize          int           `yaml:"batch_size"`
	BatchLinger        time.Duration `yaml:"batch_linger"`
	Owner              string        `yaml:"owner"`
	Lease              time.Duration `yaml:"lease"`
	HandlerTimeout     time.Duration `yaml:"handler_timeout"`
	MaxAttempts        int           `yaml:"max_attempts"`
	RetryBase          time.Duration `yaml:"retry_base"`
	RetryMax           time.Duration `yaml:"retry_max"`
	ResyncInterval     time.Duration `yaml:"resync_interval"`
	FullResyncOnStart  bool          `yaml:"full_resync_on_start"`
	CheckpointInterval time.Duration `yaml:"checkpoint_interval"`
	FeedTimeout        time.Duration `yaml:"feed_timeout"`
	FeedHeartbeat      time.Duration `yaml:"feed_heartbeat"`
	FeedBatch          int           `yaml:"feed_batch"`
	FeedLinger         time.Duration `yaml:"feed_linger"`
	MaxPending         int           `yaml:"max_pending"`
	MaxDocBytes        int           `yaml:"max_doc_bytes"`
	MaxPendingBytes    int           `yaml:"max_pending_bytes"`
	DrainTimeout       time.Duration `yaml:"drain_timeout"`
	Members            bool          `yaml:"members"`
	FeedWithoutBodies  bool          `yaml:"feed_without_bodies"`
	MemberLease        time.Duration `yaml:"member_lease"`
}

// Log configures the slog logger.
type Log struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// HTTP configures the metrics and health listener.
type HTTP struct {
	// Listen is the private listener (metrics, health, readiness), a
	// host:port; empty disables it.
	Listen string `yaml:"listen"`
	// PublicListen serves what devices and their owners reach (the
	// device confirmation page), apart from the private one; empty = off.
	PublicListen string `yaml:"public_listen"`
}

// Default returns the built-in defaults. They form a valid configuration
// for a CouchDB on localhost in admin party mode, so a development run needs
// no file at all.
func Default() Config {
	return Config{
		CouchDB: CouchDB{
			URL:            "http://127.0.0.1:5984",
			MaxConnections: 64,
		},
		Database: "docstate",
		Engine: Engine{
			Name:               "docstate",
			Workers:            16,
			BatchSize:          250,
			BatchLinger:        5 * time.Millisecond,
			Lease:              2 * time.Minute,
			HandlerTimeout:     30 * time.Second,
			MaxAttempts:        5,
			RetryBase:          time.Second,
			RetryMax:           time.Hour,
			ResyncInterval:     time.Minute,
			FullResyncOnStart:  true,
			CheckpointInterval: 5 * time.Second,
			FeedTimeout:        60 * time.Second,
			FeedHeartbeat:      5 * time.Second,
			FeedBatch:          500,
			FeedLinger:         20 * time.Millisecond,
			MaxPending:         10000,
			MaxDocBytes:        1 << 20,
			MaxPendingBytes:    64 << 20,
			DrainTimeout:       30 * time.Second,
			Members:            true,
			MemberLease:        30 * time.Second,
		},
		Log: Log{
			Level:  "info",
			Format: "text",
		},
		HTTP: HTTP{
			Listen: "127.0.0.1:9490",
		},
		SMTP: SMTP{
			Port:    587,
			TLS:     "mandatory",
			Timeout: 30 * time.Second,
		},
		Devices: Devices{
			CodeTTL:        15 * time.Minute,
			ResendInterval: time.Minute,
			MaxAttempts:    5,
			AddressSends:   5,
			AddressWindow:  time.Hour,
			GlobalSends:    600,
			GlobalWindow:   time.Hour,
			MaxIterations:  1000000,
			Pairing:        "users",
			HealInterval:   time.Minute,
		},
		Databases: Databases{
			MaxOpen:           32,
			DiscoveryInterval: 10 * time.Second,
			IdleStop:          30 * time.Second,
			Turn:              time.Minute,
		},
		Channels: Channels{
			Prefix:            "channel-",
			OnDelete:          "delete",
			ReconcileInterval: time.Minute,
			MaxMembers:        100,
		},
	}
}

// Redacted returns a copy of c that is safe to print or log: the password
// is replaced by "[redacted]" (an empty password stays empty, so the output
// still tells whether one is set), and so is any password embedded in the
// URL, which Validate refuses but which may be present in a config being
// printed precisely because it does not validate.
func (c Config) Redacted() Config {
	if c.CouchDB.Password != "" {
		c.CouchDB.Password = redactedValue
	}
	c.CouchDB.URL = redactURL(c.CouchDB.URL)
	if c.SMTP.Password != "" {
		c.SMTP.Password = redactedValue
	}
	return c
}

// redactURL hides the password of a URL with user info. A URL that does
// not parse but contains '@' may hold credentials we cannot locate, so it is
// hidden entirely.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		if strings.Contains(raw, "@") {
			return redactedValue
		}
		return raw
	}
	if u.User == nil {
		return raw
	}
	// Redacted keeps the username and replaces the password with "xxxxx".
	return u.Redacted()
}
