package cli

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/spf13/cobra"

	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/supervisor"
)

// Check statuses. A warning does not fail the check: the daemon would run,
// but probably not as meant.
const (
	checkOK   = "ok"
	checkWarn = "warn"
	checkFail = "fail"
)

// checkResult is one line of docstate check. Its JSON keys are part of the
// command line's interface (check -o json): lower-case and stable.
type checkResult struct {
	// Name is what was checked: config, couchdb, database, databases,
	// admin, handlers, smtp, http.
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

// checkHandler is a registered handler in check's report.
type checkHandler struct {
	Type  string `json:"type"`
	State string `json:"state"`
	Mode  string `json:"mode"`
}

// checkReport is what check -o json prints.
type checkReport struct {
	// OK is false when any check failed (the exit code is then 1).
	OK       bool           `json:"ok"`
	Checks   []checkResult  `json:"checks"`
	Handlers []checkHandler `json:"handlers"`
}

func (r *checkReport) add(name, status, format string, args ...any) {
	r.Checks = append(r.Checks, checkResult{Name: name, Status: status, Message: fmt.Sprintf(format, args...)})
	if status == checkFail {
		r.OK = false
	}
}

// checkTimeout bounds the whole check: each step is one request or one
// SMTP session.
const checkTimeout = 30 * time.Second

func newCheckCmd(g *globals, opts Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check what run needs: config, CouchDB, rights, handlers, SMTP, the HTTP listener",
		Long: `Check tests, without changing anything, what 'docstate run' needs:

  config     the configuration loads and is valid
  couchdb    the server answers and accepts the credentials
  database   the watched database exists and can be read (many-database
             mode: _all_dbs can be listed; the matching databases now)
  admin      the user is a server admin, when devices.enabled or
             channels.enabled is on (they write _users documents with roles,
             create databases and set _security)
  handlers   the handler sets build; 0 handlers is a warning: the daemon
             would follow the feed and do nothing
  smtp       with devices.enabled: a session with the relay as a send opens
             it (connect, EHLO, STARTTLS per smtp.tls, AUTH), then QUIT;
             nothing is sent
  http       http.listen can be bound (so run check before starting the
             daemon on the same host, or it reports the running daemon's
             port as taken)

It prints one line per check and exits 1 if any failed; warnings do not
fail it.`,
		Example: `  docstate check --config /etc/docstate/docstate.yaml
  docstate check --set smtp.host=mail.example.com -o json | jq '.checks[] | select(.status != "ok")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
			rep := runChecks(cmd, g, opts)
			if asJSON {
				if err := writeJSON(cmd.OutOrStdout(), rep); err != nil {
					return err
				}
			} else {
				printChecks(cmd.OutOrStdout(), rep)
			}
			if !rep.OK {
				return errProblems
			}
			return nil
		},
	}
	addJSONFlag(cmd)
	return cmd
}

// printChecks writes one line per check, then the handlers.
func printChecks(w io.Writer, rep checkReport) {
	for _, c := range rep.Checks {
		switch {
		case c.Status == checkOK && c.Message == "":
			fmt.Fprintf(w, "%s: ok\n", c.Name)
		case c.Status == checkOK:
			fmt.Fprintf(w, "%s: ok (%s)\n", c.Name, c.Message)
		case c.Status == checkWarn:
			fmt.Fprintf(w, "%s: warning: %s\n", c.Name, c.Message)
		default:
			fmt.Fprintf(w, "%s: FAIL: %s\n", c.Name, c.Message)
		}
		if c.Name == "handlers" {
			for _, h := range rep.Handlers {
				fmt.Fprintf(w, "  %-16s %-16s %s\n", h.Type, h.State, h.Mode)
			}
		}
	}
}

// runChecks runs every check it can: a failure stops only the checks that
// depend on it, so one run names every problem.
func runChecks(cmd *cobra.Command, g *globals, opts Options) checkReport {
	rep := checkReport{OK: true, Checks: []checkResult{}, Handlers: []checkHandler{}}
	cfg, err := g.load(opts)
	if err != nil {
		rep.add("config", checkFail, "%v", err)
		return rep
	}
	rep.add("config", checkOK, "")
	ctx, cancel := context.WithTimeout(cmd.Context(), checkTimeout)
	defer cancel()
	client, db, err := connect(cfg)
	if err != nil {
		rep.add("couchdb", checkFail, "%v", err)
		return rep
	}
	defer client.Close()
	// The server checks basic-auth credentials on every request, GET /
	// included, so a 401 here means they were refused.
	if _, err := client.Version(ctx); err != nil {
		if couch.IsUnauthorized(err) {
			rep.add("couchdb", checkFail, "%s refused the credentials of user %q", cfg.CouchDB.URL, cfg.CouchDB.Username)
		} else {
			rep.add("couchdb", checkFail, "cannot reach %s: %v", cfg.CouchDB.URL, err)
		}
		return rep
	}
	rep.add("couchdb", checkOK, "%s", cfg.CouchDB.URL)
	checkDatabase(ctx, &rep, cfg, client, db)
	checkAdmin(ctx, &rep, cfg, client)

	env := Env{Config: cfg, Client: client, DB: db, Logger: newLogger(cfg, cmd.ErrOrStderr()), Mux: http.NewServeMux()}
	if _, reg, _, err := build(cfg, opts, env); err != nil {
		rep.add("handlers", checkFail, "%v", err)
	} else {
		for _, s := range reg.Specs() {
			rep.Handlers = append(rep.Handlers, checkHandler{Type: s.Type, State: s.State, Mode: s.Mode.String()})
		}
		if reg.Len() == 0 {
			rep.add("handlers", checkWarn, "0 registered: the daemon would follow the feed and do nothing")
		} else {
			rep.add("handlers", checkOK, "%d registered", reg.Len())
		}
	}
	if cfg.Devices.Enabled {
		checkSMTP(ctx, &rep, cfg, env)
	}
	if cfg.Channels.Enabled {
		checkTemplates(ctx, &rep, cfg, client)
	}
	if cfg.HTTP.PublicListen != "" {
		checkListen(ctx, &rep, "http_public", cfg.HTTP.PublicListen)
	}
	if cfg.HTTP.Listen != "" {
		checkListen(ctx, &rep, "http", cfg.HTTP.Listen)
	}
	return rep
}

// checkDatabase checks the watched database, or in many-database mode that
// the databases can be listed.
func checkDatabase(ctx context.Context, rep *checkReport, cfg config.Config, client *kivik.Client, db *kivik.DB) {
	if patterns := cfg.Databases.PatternList(); len(patterns) > 0 {
		// Many-database mode: the databases come and go; list the ones
		// there now.
		names, err := client.AllDBs(ctx)
		if err != nil {
			rep.add("databases", checkFail, "cannot list _all_dbs (an admin right): %v", err)
			return
		}
		n := 0
		for _, name := range names {
			if supervisor.MatchDatabase(patterns, name) {
				n++
			}
		}
		discovery := fmt.Sprintf("discovery by _all_dbs every %v", cfg.Databases.DiscoveryInterval)
		if couch.HasDBUpdates(ctx, client) {
			discovery = fmt.Sprintf("discovery by /_db_updates, with an _all_dbs catch-up every %v",
				10*cfg.Databases.DiscoveryInterval)
		}
		rep.add("databases", checkOK, "many-database mode: %d databases match %s now, %s",
			n, strings.Join(patterns, ","), discovery)
		return
	}
	if _, err := db.Stats(ctx); err != nil {
		switch kivik.HTTPStatus(err) {
		case http.StatusNotFound:
			rep.add("database", checkFail, "%q does not exist on %s", cfg.Database, cfg.CouchDB.URL)
		case http.StatusUnauthorized, http.StatusForbidden:
			rep.add("database", checkFail, "%q refused the credentials of user %q: %v", cfg.Database, cfg.CouchDB.Username, err)
		default:
			rep.add("database", checkFail, "%q: %v", cfg.Database, err)
		}
		return
	}
	rep.add("database", checkOK, "%q", cfg.Database)
}

// checkAdmin checks the user is a server admin when a built-in set needs
// one: devices writes _users documents with roles, channels creates
// databases and writes their _security. Without it run starts, and every
// registration or channel fails later, one document at a time.
func checkAdmin(ctx context.Context, rep *checkReport, cfg config.Config, client *kivik.Client) {
	var need []string
	if cfg.Devices.Enabled {
		need = append(need, "devices.enabled (writes _users documents with roles)")
	}
	if cfg.Channels.Enabled {
		need = append(need, "channels.enabled (creates databases, writes _security)")
	}
	if len(need) == 0 {
		return
	}
	s, err := client.Session(ctx)
	if err != nil {
		rep.add("admin", checkFail, "cannot read /_session to check the user's roles: %v", err)
		return
	}
	if !slices.Contains(s.Roles, "_admin") {
		name := s.Name
		if name == "" {
			name = cfg.CouchDB.Username
		}
		rep.add("admin", checkFail, "user %q is not a server admin (roles %v); %s needs one",
			name, s.Roles, strings.Join(need, " and "))
		return
	}
	rep.add("admin", checkOK, "user %q is a server admin", s.Name)
}

// checkTemplates checks that every channel template database exists: a
// channel asked for with a missing one would record its seed as failed.
func checkTemplates(ctx context.Context, rep *checkReport, cfg config.Config, client *kivik.Client) {
	templates, err := cfg.Channels.TemplateMap()
	if err != nil || len(templates) == 0 {
		return // Load refused a malformed list; none is nothing to check
	}
	var missing []string
	for _, name := range slices.Sorted(maps.Keys(templates)) {
		ok, err := client.DBExists(ctx, templates[name])
		if err != nil {
			rep.add("templates", checkFail, "cannot check template %s (%s): %v", name, templates[name], err)
			return
		}
		if !ok {
			missing = append(missing, name+"="+templates[name])
		}
	}
	if len(missing) > 0 {
		rep.add("templates", checkWarn, "template databases missing: %s (channels asked for with them record seed failed)", strings.Join(missing, ", "))
		return
	}
	rep.add("templates", checkOK, "%d template databases found", len(templates))
}

// checkSMTP opens a session with the relay as a registration mail would.
func checkSMTP(ctx context.Context, rep *checkReport, cfg config.Config, env Env) {
	m, err := handlers.NewSMTPMailer(cfg, env.Logger)
	if err != nil {
		rep.add("smtp", checkFail, "%v", err)
		return
	}
	if err := m.Dial(ctx); err != nil {
		rep.add("smtp", checkFail, "%v", err)
		return
	}
	what := []string{"EHLO"}
	if cfg.SMTP.ImplicitTLS {
		what = append([]string{"TLS"}, what...)
	} else if cfg.SMTP.TLS != "none" {
		what = append(what, "STARTTLS ("+cfg.SMTP.TLS+")")
	}
	if cfg.SMTP.Username != "" {
		what = append(what, fmt.Sprintf("AUTH as %q", cfg.SMTP.Username))
	}
	rep.add("smtp", checkOK, "%s: %s", net.JoinHostPort(cfg.SMTP.Host, fmt.Sprint(smtpPort(cfg))), strings.Join(what, ", "))
}

// smtpPort is the port the mailer dials: smtp.port, or the mailer's
// default for the TLS mode.
func smtpPort(cfg config.Config) int {
	switch {
	case cfg.SMTP.Port != 0:
		return cfg.SMTP.Port
	case cfg.SMTP.ImplicitTLS:
		return 465
	}
	return 587
}

// checkListen binds a listener's address and lets it go.
func checkListen(ctx context.Context, rep *checkReport, name, addr string) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		rep.add(name, checkFail, "cannot listen on %s: %v", addr, err)
		return
	}
	_ = ln.Close()
	rep.add(name, checkOK, "%s can be bound", addr)
}
