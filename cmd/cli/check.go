package cli

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/spf13/cobra"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

func newCheckCmd(g *globals, opts Options) *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Validate the config, reach CouchDB, and list the registered handlers",
		Long: `Check loads the configuration, connects to CouchDB with its credentials,
checks the watched database exists and can be read, builds the handler
registry, and prints what the daemon would run. It prints one line per
problem and exits non-zero if there is any.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			cfg, err := g.load(opts)
			if err != nil {
				fmt.Fprintln(out, "config: FAIL")
				fmt.Fprintln(out, err)
				return errProblems
			}
			fmt.Fprintln(out, "config: ok")
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			client, db, err := connect(cfg)
			if err != nil {
				fmt.Fprintln(out, "couchdb:", err)
				return errProblems
			}
			defer client.Close()
			problems := 0
			// The server checks basic-auth credentials on every request,
			// GET / included, so a 401 here means they were refused.
			if _, err := client.Version(ctx); err != nil {
				if couch.IsUnauthorized(err) {
					fmt.Fprintf(out, "couchdb: %s refused the credentials of user %q\n", cfg.CouchDB.URL, cfg.CouchDB.Username)
				} else {
					fmt.Fprintf(out, "couchdb: cannot reach %s: %v\n", cfg.CouchDB.URL, err)
				}
				return errProblems
			}
			if patterns := cfg.Databases.PatternList(); len(patterns) > 0 {
				// Many-database mode: the databases come and go; list the
				// ones there now.
				names, err := client.AllDBs(ctx)
				if err != nil {
					fmt.Fprintf(out, "databases: cannot list _all_dbs (an admin right): %v\n", err)
					return errProblems
				}
				n := 0
				for _, name := range names {
					if workflow.MatchDatabase(patterns, name) {
						n++
					}
				}
				discovery := fmt.Sprintf("discovery by _all_dbs every %v", cfg.Databases.DiscoveryInterval)
				if workflow.HasDBUpdates(ctx, client) {
					discovery = fmt.Sprintf("discovery by /_db_updates, with an _all_dbs catch-up every %v",
						10*cfg.Databases.DiscoveryInterval)
				}
				fmt.Fprintf(out, "couchdb: ok (%s); many-database mode: %d databases match %s now, %s\n",
					cfg.CouchDB.URL, n, strings.Join(patterns, ","), discovery)
			} else if _, err := db.Stats(ctx); err != nil {
				problems++
				switch kivik.HTTPStatus(err) {
				case http.StatusNotFound:
					fmt.Fprintf(out, "database: %q does not exist on %s\n", cfg.Database, cfg.CouchDB.URL)
				case http.StatusUnauthorized, http.StatusForbidden:
					fmt.Fprintf(out, "database: %q refused the credentials of user %q: %v\n", cfg.Database, cfg.CouchDB.Username, err)
				default:
					fmt.Fprintf(out, "database: %q: %v\n", cfg.Database, err)
				}
			} else {
				fmt.Fprintf(out, "couchdb: ok (%s, database %q)\n", cfg.CouchDB.URL, cfg.Database)
			}
			env := Env{Config: cfg, Client: client, DB: db, Logger: newLogger(cfg, cmd.ErrOrStderr()), Mux: http.NewServeMux()}
			_, reg, _, err := build(cfg, opts, env)
			if err != nil {
				fmt.Fprintln(out, "handlers:", err)
				return errProblems
			}
			fmt.Fprintf(out, "handlers: %d registered\n", reg.Len())
			for _, s := range reg.Specs() {
				fmt.Fprintf(out, "  %-16s %-16s %s\n", s.Type, s.State, s.Mode)
			}
			if problems > 0 {
				return errProblems
			}
			return nil
		},
	}
}
