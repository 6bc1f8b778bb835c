package config

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/docstate/docstate/internal/dbname"
)

// envPrefix starts the environment variable of every key.
const envPrefix = "DOCSTATE_"

// KeyInfo describes one configuration key, for documentation and --help.
// Its JSON keys are part of the command line's interface (config keys -o
// json): lower-case and stable.
type KeyInfo struct {
	// Key is the dotted key used in YAML nesting and overrides, e.g.
	// "engine.workers".
	Key string `json:"key"`
	// Env is the environment variable that sets the key, e.g.
	// "DOCSTATE_ENGINE_WORKERS".
	Env string `json:"env"`
	// Type is "string", "int", "bool" or "duration".
	Type string `json:"type"`
	// Default is the built-in default in the syntax every source accepts,
	// e.g. "2m" for a duration.
	Default string `json:"default"`
	// Help is a one-line description including the allowed range.
	Help string `json:"help"`
	// Secret marks keys whose value is never printed.
	Secret bool `json:"secret"`
}

// Keys returns every configuration key in a stable order (the order of the
// example file), with its environment variable, type, default and help.
func Keys() []KeyInfo {
	def := Default()
	table := keyTable()
	infos := make([]KeyInfo, 0, len(table))
	for _, k := range table {
		info := KeyInfo{
			Key:     k.name,
			Env:     envName(k.name),
			Type:    k.typ,
			Default: k.get(&def),
			Help:    k.help,
			Secret:  k.secret,
		}
		if info.Secret && info.Default != "" {
			info.Default = redactedValue
		}
		infos = append(infos, info)
	}
	return infos
}

// envName maps a dotted key to its environment variable.
func envName(key string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// key is one row of the key table. The table is the single description of
// the configuration: the YAML walker, the environment, the overrides,
// Validate and Keys all iterate over it, so adding a key here is enough for
// every source to accept it and for the docs to list it.
type key struct {
	name   string
	typ    string
	help   string
	secret bool
	// get formats the key's current value in c.
	get func(c *Config) string
	// set parses s and stores it in c; errors do not name the key, the
	// caller adds where the value came from.
	set func(c *Config, s string) error
	// check validates the value in the complete config (rules may look at
	// other keys); nil means every parsable value is valid.
	check func(c *Config) error
}

// apply calls set and guarantees that a secret's value never reaches an
// error message, whatever the parser would have said.
func (k key) apply(c *Config, s string) error {
	if err := k.set(c, s); err != nil {
		if k.secret {
			return errors.New("invalid value (not shown: secret)")
		}
		return err
	}
	return nil
}

// codec converts between a field type and the string form used by
// environment variables, overrides, YAML scalars and docs.
type codec[T any] struct {
	typ    string
	parse  func(string) (T, error)
	format func(T) string
}

// newKey builds a table row for the field that field points to. Taking an
// accessor instead of reflecting over struct tags keeps the table checked
// by the compiler.
func newKey[T any](
	name, help string,
	field func(*Config) *T,
	cd codec[T],
	check func(c *Config, v T) error,
) key {
	k := key{
		name: name,
		typ:  cd.typ,
		help: help,
		get:  func(c *Config) string { return cd.format(*field(c)) },
		set: func(c *Config, s string) error {
			v, err := cd.parse(s)
			if err != nil {
				return err
			}
			*field(c) = v
			return nil
		},
	}
	if check != nil {
		k.check = func(c *Config) error { return check(c, *field(c)) }
	}
	return k
}

func stringCodec() codec[string] {
	return codec[string]{
		typ:    "string",
		parse:  func(s string) (string, error) { return s, nil },
		format: func(s string) string { return s },
	}
}

func intCodec() codec[int] {
	return codec[int]{
		typ: "int",
		parse: func(s string) (int, error) {
			// Base 10 only: "010" meaning 8 would surprise in an env var.
			v, err := strconv.ParseInt(s, 10, 0)
			if err != nil {
				var numErr *strconv.NumError
				if errors.As(err, &numErr) {
					err = numErr.Err
				}
				return 0, fmt.Errorf("invalid integer %q: %w", s, err)
			}
			return int(v), nil
		},
		format: strconv.Itoa,
	}
}

func boolCodec() codec[bool] {
	return codec[bool]{
		typ: "bool",
		parse: func(s string) (bool, error) {
			// strconv rules rather than YAML 1.1's yes/no/on/off, so the
			// file and the environment accept exactly the same spellings.
			v, err := strconv.ParseBool(s)
			if err != nil {
				return false, fmt.Errorf("invalid boolean %q, want true or false", s)
			}
			return v, nil
		},
		format: strconv.FormatBool,
	}
}

func durationCodec() codec[time.Duration] {
	return codec[time.Duration]{
		typ: "duration",
		parse: func(s string) (time.Duration, error) {
			v, err := time.ParseDuration(s)
			if err != nil {
				// time's message repeats the value and, for the common
				// mistake of a bare number, does not say what to write.
				return 0, fmt.Errorf("invalid duration %q, want a number with a unit such as \"30s\", \"2m\" or \"1h\"", s)
			}
			return v, nil
		},
		format: formatDuration,
	}
}

// formatDuration is time.Duration.String without the zero tails, so that
// defaults read "2m" and "1h" as in the docs rather than "2m0s" and
// "1h0m0s". The result parses back to the same duration.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// keyTable returns the key table. It is built on each call rather than
// kept in a package variable: it is small, and the package has no globals.
func keyTable() []key {
	secret := func(k key) key {
		k.secret = true
		return k
	}
	return []key{
		newKey("couchdb.url",
			"CouchDB base URL, http or https; must not contain credentials",
			func(c *Config) *string { return &c.CouchDB.URL }, stringCodec(), checkURL),
		newKey("couchdb.username",
			"CouchDB user for basic auth; empty = no authentication",
			func(c *Config) *string { return &c.CouchDB.Username }, stringCodec(), checkUsername),
		secret(newKey("couchdb.password",
			"password for couchdb.username (secret); prefer couchdb.password_file",
			func(c *Config) *string { return &c.CouchDB.Password }, stringCodec(), nil)),
		newKey("couchdb.password_file",
			"file holding the password, read at load, trailing newline trimmed; exclusive with couchdb.password",
			func(c *Config) *string { return &c.CouchDB.PasswordFile }, stringCodec(), checkPasswordFile),
		newKey("couchdb.max_connections",
			"maximum concurrent HTTP connections to CouchDB; > 0",
			func(c *Config) *int { return &c.CouchDB.MaxConnections }, intCodec(), intAtLeast(1)),
		newKey("database",
			"the watched database; a valid CouchDB name, ^[a-z][a-z0-9_$()+/-]*$, at most 238 characters",
			func(c *Config) *string { return &c.Database }, stringCodec(), checkDatabase),
		newKey("engine.name",
			"name of this handler set on the database; the checkpoint is _local/docstate-<name>",
			func(c *Config) *string { return &c.Engine.Name }, stringCodec(), checkEngineName),
		newKey("engine.workers",
			"handlers run at once; 1..1024",
			func(c *Config) *int { return &c.Engine.Workers }, intCodec(), intBetween(1, 1024)),
		newKey("engine.batch_size",
			"most document writes per _bulk_docs request (group commit); 1 = off, one PUT per write; 1..10000",
			func(c *Config) *int { return &c.Engine.BatchSize }, intCodec(), intBetween(1, 10000)),
		newKey("engine.batch_linger",
			"longest a write waits for others to join its batch; 0..1s",
			func(c *Config) *time.Duration { return &c.Engine.BatchLinger }, durationCodec(),
			durationBetween(0, time.Second)),
		newKey("engine.owner",
			"claim owner id; empty = hostname-pid-random chosen at start",
			func(c *Config) *string { return &c.Engine.Owner }, stringCodec(), nil),
		newKey("engine.lease",
			"default claim lease for unsafe handlers; >= 1s",
			func(c *Config) *time.Duration { return &c.Engine.Lease }, durationCodec(), durationAtLeast(time.Second)),
		newKey("engine.handler_timeout",
			"default per-handler timeout; > 0 and < engine.lease",
			func(c *Config) *time.Duration { return &c.Engine.HandlerTimeout }, durationCodec(), checkHandlerTimeout),
		newKey("engine.max_attempts",
			"default failed attempts before the error state; 1..1000",
			func(c *Config) *int { return &c.Engine.MaxAttempts }, intCodec(), intBetween(1, 1000)),
		newKey("engine.retry_base",
			"retry backoff base; > 0 and <= engine.retry_max",
			func(c *Config) *time.Duration { return &c.Engine.RetryBase }, durationCodec(), checkRetryBase),
		newKey("engine.retry_max",
			"retry backoff cap; > 0",
			func(c *Config) *time.Duration { return &c.Engine.RetryMax }, durationCodec(), durationPositive),
		newKey("engine.resync_interval",
			"interval of the periodic scan for due documents; >= 1s",
			func(c *Config) *time.Duration { return &c.Engine.ResyncInterval }, durationCodec(), durationAtLeast(time.Second)),
		newKey("engine.full_resync_on_start",
			"at start, queue every document in a registered type and state (level-triggered start)",
			func(c *Config) *bool { return &c.Engine.FullResyncOnStart }, boolCodec(), nil),
		newKey("engine.members",
			"daemons of the same engine.name on one database split its documents by consistent hashing (membership documents with a lease); false: each handles all",
			func(c *Config) *bool { return &c.Engine.Members }, boolCodec(), nil),
		newKey("engine.feed_without_bodies",
			"read the changes feed without bodies and fetch only the bodies to handle, one _bulk_get per feed answer, even as the only member (with two or more members it is always so); for CouchDB, where include_docs costs a read per row",
			func(c *Config) *bool { return &c.Engine.FeedWithoutBodies }, boolCodec(), nil),
		newKey("engine.member_lease",
			"lease of a daemon's membership document, renewed every third of it; a stopped daemon's share moves at once, a dead one's after this; 1s..10m",
			func(c *Config) *time.Duration { return &c.Engine.MemberLease }, durationCodec(),
			durationBetween(time.Second, 10*time.Minute)),
		newKey("engine.checkpoint_interval",
			"how often the feed position is saved; >= 100ms",
			func(c *Config) *time.Duration { return &c.Engine.CheckpointInterval }, durationCodec(),
			durationAtLeast(100*time.Millisecond)),
		newKey("engine.feed_timeout",
			"how long one longpoll of the _changes feed waits for a change before the daemon asks again (no failure); 1s..10m",
			func(c *Config) *time.Duration { return &c.Engine.FeedTimeout }, durationCodec(),
			durationBetween(time.Second, 10*time.Minute)),
		newKey("engine.feed_heartbeat",
			"heartbeat asked of the server on a longpoll: renews contact; a longpoll silent for 3 heartbeats + 2s is a dead connection; 100ms..1m",
			func(c *Config) *time.Duration { return &c.Engine.FeedHeartbeat }, durationCodec(),
			durationBetween(100*time.Millisecond, time.Minute)),
		newKey("engine.feed_batch",
			"changes per longpoll request; 1..10000",
			func(c *Config) *int { return &c.Engine.FeedBatch }, intCodec(), intBetween(1, 10000)),
		newKey("engine.feed_linger",
			"pause before re-polling a caught-up feed, so bursts share one request; 0..1s",
			func(c *Config) *time.Duration { return &c.Engine.FeedLinger }, durationCodec(),
			durationBetween(0, time.Second)),
		newKey("engine.max_pending",
			"changes received but not finished before the feed pauses; >= engine.feed_batch",
			func(c *Config) *int { return &c.Engine.MaxPending }, intCodec(), checkMaxPending),
		newKey("engine.max_doc_bytes",
			"largest document handled, bytes of JSON; larger ones are refused unread and unwritten (logged, counted); 1024..1073741824",
			func(c *Config) *int { return &c.Engine.MaxDocBytes }, intCodec(), intBetween(1024, 1<<30)),
		newKey("engine.max_pending_bytes",
			"document bytes held at once (feed bodies queued and documents in progress); >= 2 x engine.max_doc_bytes",
			func(c *Config) *int { return &c.Engine.MaxPendingBytes }, intCodec(), checkMaxPendingBytes),
		newKey("engine.drain_timeout",
			"bound on the graceful stop; >= 0",
			func(c *Config) *time.Duration { return &c.Engine.DrainTimeout }, durationCodec(), durationAtLeast(0)),
		newKey("log.level",
			"log level: debug, info, warn or error",
			func(c *Config) *string { return &c.Log.Level }, stringCodec(), oneOf("debug", "info", "warn", "error")),
		newKey("log.format",
			"log format: text or json",
			func(c *Config) *string { return &c.Log.Format }, stringCodec(), oneOf("text", "json")),
		newKey("http.listen",
			"private listener for /metrics, /healthz and /readyz, host:port (keep it off the internet); empty = off",
			func(c *Config) *string { return &c.HTTP.Listen }, stringCodec(), checkListen),
		newKey("http.public_listen",
			"public listener for the device confirmation page (devices.base_url points at it), host:port; empty = off",
			func(c *Config) *string { return &c.HTTP.PublicListen }, stringCodec(), checkListen),
		newKey("smtp.host",
			"SMTP relay host for device mail; required when devices.enabled",
			func(c *Config) *string { return &c.SMTP.Host }, stringCodec(), checkSMTPHost),
		newKey("smtp.port",
			"SMTP relay port; 1..65535 (587 submission, 465 with smtp.implicit_tls)",
			func(c *Config) *int { return &c.SMTP.Port }, intCodec(), intBetween(1, 65535)),
		newKey("smtp.tls",
			"TLS policy: mandatory (STARTTLS required), opportunistic, or none (loopback relays only)",
			func(c *Config) *string { return &c.SMTP.TLS }, stringCodec(), oneOf("mandatory", "opportunistic", "none")),
		newKey("smtp.implicit_tls",
			"connect with TLS from the first byte (SMTPS) instead of STARTTLS; not with smtp.tls none",
			func(c *Config) *bool { return &c.SMTP.ImplicitTLS }, boolCodec(), checkImplicitTLS),
		newKey("smtp.username",
			"SMTP AUTH user; empty = no AUTH",
			func(c *Config) *string { return &c.SMTP.Username }, stringCodec(), checkSMTPUsername),
		secret(newKey("smtp.password",
			"password for smtp.username (secret); prefer smtp.password_file",
			func(c *Config) *string { return &c.SMTP.Password }, stringCodec(), nil)),
		newKey("smtp.password_file",
			"file holding the SMTP password, read at load, trailing newline trimmed; exclusive with smtp.password",
			func(c *Config) *string { return &c.SMTP.PasswordFile }, stringCodec(), checkSMTPPasswordFile),
		newKey("smtp.helo",
			"name sent in EHLO; empty = go-mail's default (localhost); no spaces",
			func(c *Config) *string { return &c.SMTP.HELO }, stringCodec(), checkHELO),
		newKey("smtp.timeout",
			"bound on connecting and on each SMTP command; 1s..10m",
			func(c *Config) *time.Duration { return &c.SMTP.Timeout }, durationCodec(),
			durationBetween(time.Second, 10*time.Minute)),
		newKey("smtp.from",
			"sender address of device mail, a bare address; required when devices.enabled",
			func(c *Config) *string { return &c.SMTP.From }, stringCodec(), checkSMTPFrom),
		newKey("devices.enabled",
			"register the device handlers (needs smtp.host, smtp.from and devices.secret_file)",
			func(c *Config) *bool { return &c.Devices.Enabled }, boolCodec(), nil),
		newKey("devices.secret_file",
			"file holding the HMAC key for codes and links, at least 32 bytes from a CSPRNG; required when devices.enabled",
			func(c *Config) *string { return &c.Devices.SecretFile }, stringCodec(), checkSecretFile),
		newKey("devices.base_url",
			"public http(s) URL of the HTTP listener for confirmation links; empty = codes only",
			func(c *Config) *string { return &c.Devices.BaseURL }, stringCodec(), checkConfirmBaseURL),
		newKey("devices.code_ttl",
			"how long a confirmation code is valid; 1m..24h",
			func(c *Config) *time.Duration { return &c.Devices.CodeTTL }, durationCodec(),
			durationBetween(time.Minute, 24*time.Hour)),
		newKey("devices.resend_interval",
			"least time between two mails to one device; 0..24h",
			func(c *Config) *time.Duration { return &c.Devices.ResendInterval }, durationCodec(),
			durationBetween(0, 24*time.Hour)),
		newKey("devices.max_attempts",
			"wrong codes that lock a device; 1..100",
			func(c *Config) *int { return &c.Devices.MaxAttempts }, intCodec(), intBetween(1, 100)),
		newKey("devices.address_sends",
			"mails to one address per devices.address_window, over all its devices; 1..1000",
			func(c *Config) *int { return &c.Devices.AddressSends }, intCodec(), intBetween(1, 1000)),
		newKey("devices.address_window",
			"window of the per-address mail limit; 1m..168h",
			func(c *Config) *time.Duration { return &c.Devices.AddressWindow }, durationCodec(),
			durationBetween(time.Minute, 168*time.Hour)),
		newKey("devices.global_sends",
			"mails per devices.global_window in all, to every address, over every daemon sharing the control database; 1..1000000",
			func(c *Config) *int { return &c.Devices.GlobalSends }, intCodec(), intBetween(1, 1000000)),
		newKey("devices.global_window",
			"window of the global mail limit; 1m..168h",
			func(c *Config) *time.Duration { return &c.Devices.GlobalWindow }, durationCodec(),
			durationBetween(time.Minute, 168*time.Hour)),
		newKey("devices.max_iterations",
			"largest PBKDF2 iteration count a device may ask for (the server pays it per basic-auth request); 1..10000000",
			func(c *Config) *int { return &c.Devices.MaxIterations }, intCodec(), intBetween(1, 10000000)),
		newKey("devices.templates_dir",
			"directory with subject.txt, body.txt, body.html overriding the built-in mail templates; empty = built-in",
			func(c *Config) *string { return &c.Devices.TemplatesDir }, stringCodec(), nil),
		newKey("devices.pairing",
			"how devices pair: users (each signs up as its own CouchDB user; the control database is the daemon's alone; each owner gets a private control database) or control (devices write into the shared control database; older, see README)",
			func(c *Config) *string { return &c.Devices.Pairing }, stringCodec(), oneOf("control", "users")),
		newKey("devices.public_url",
			"server URL as devices reach it; with pairing users an active device's status names <public_url>/<its owner's control database>",
			func(c *Config) *string { return &c.Devices.PublicURL }, stringCodec(), checkBaseURL),
		newKey("devices.heal_interval",
			"with pairing users, how often the control database's _security and every owner's control database are checked and put back; 1s..1h",
			func(c *Config) *time.Duration { return &c.Devices.HealInterval }, durationCodec(), durationBetween(time.Second, time.Hour)),
		newKey("databases.patterns",
			"comma-separated globs of databases to watch (many-database mode, e.g. userctl-*); empty = watch database only",
			func(c *Config) *string { return &c.Databases.Patterns }, stringCodec(), checkPatterns),
		newKey("databases.max_open",
			"engines (feeds) running at once in many-database mode; databases with work wait their turn; 1..10000",
			func(c *Config) *int { return &c.Databases.MaxOpen }, intCodec(), intBetween(1, 10000)),
		newKey("databases.discovery_interval",
			"how often _all_dbs is listed and update_seqs compared (every 10 with /_db_updates): work is noticed within it; 100ms..1h",
			func(c *Config) *time.Duration { return &c.Databases.DiscoveryInterval }, durationCodec(),
			durationBetween(100*time.Millisecond, time.Hour)),
		newKey("databases.idle_stop",
			"stop a database's engine after this long with nothing to do; 100ms..24h",
			func(c *Config) *time.Duration { return &c.Databases.IdleStop }, durationCodec(),
			durationBetween(100*time.Millisecond, 24*time.Hour)),
		newKey("databases.turn",
			"how long a busy engine keeps its slot while other databases wait; 1s..24h",
			func(c *Config) *time.Duration { return &c.Databases.Turn }, durationCodec(),
			durationBetween(time.Second, 24*time.Hour)),
		newKey("databases.shards",
			"split the matching databases between this many daemons by a stable hash of the name; 0 or 1 = every daemon watches all; 0..1024",
			func(c *Config) *int { return &c.Databases.Shards }, intCodec(), intBetween(0, 1024)),
		newKey("databases.shard",
			"this daemon's shard, 0..databases.shards-1",
			func(c *Config) *int { return &c.Databases.Shard }, intCodec(),
			func(c *Config, v int) error {
				if v < 0 || (c.Databases.Shards > 1 && v >= c.Databases.Shards) || (c.Databases.Shards <= 1 && v != 0) {
					return fmt.Errorf("must be in 0..%d (databases.shards - 1)", max(c.Databases.Shards-1, 0))
				}
				return nil
			}),
		newKey("channels.enabled",
			"register the channel handlers: per-user channel databases, secured, with device subscriptions",
			func(c *Config) *bool { return &c.Channels.Enabled }, boolCodec(), nil),
		newKey("channels.prefix",
			"start of every channel database name: a lowercase letter, then a-z 0-9 _$()+-/; at most 173 bytes",
			func(c *Config) *string { return &c.Channels.Prefix }, stringCodec(),
			func(_ *Config, v string) error { return dbname.CheckPrefix(v) }),
		newKey("channels.public_url",
			"server URL as devices reach it, written into subscriptions as <url>/<database>; empty = database name only",
			func(c *Config) *string { return &c.Channels.PublicURL }, stringCodec(), checkBaseURL),
		newKey("channels.on_delete",
			"what a deleted channel's database becomes: delete, or archive (kept, server admins only)",
			func(c *Config) *string { return &c.Channels.OnDelete }, stringCodec(), oneOf("delete", "archive")),
		newKey("channels.reconcile_interval",
			"how often a ready channel re-checks _security and subscriptions (devices activated since get it); 1s..24h",
			func(c *Config) *time.Duration { return &c.Channels.ReconcileInterval }, durationCodec(),
			durationBetween(time.Second, 24*time.Hour)),
		newKey("channels.templates",
			"comma-separated name=database pairs a channel request may name as its template (seeded by server-side replication); empty = none",
			func(c *Config) *string { return &c.Channels.Templates }, stringCodec(),
			func(_ *Config, v string) error { _, err := Channels{Templates: v}.TemplateMap(); return err }),
		newKey("channels.max_members",
			"most member addresses a channel may list; 1..10000",
			func(c *Config) *int { return &c.Channels.MaxMembers }, intCodec(), intBetween(1, 10000)),
	}
}
