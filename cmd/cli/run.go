package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/spf13/cobra"

	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/metrics"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

func newRunCmd(g *globals, opts Options) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon until SIGINT or SIGTERM; SIGHUP reloads the configuration",
		Long: `Run follows the configured database and runs the registered handlers.

On SIGINT or SIGTERM it stops reading the feed, lets running handlers finish
for up to engine.drain_timeout, saves the checkpoint and exits 0. Documents
still queued are not lost: their changes were not checkpointed and are
replayed at the next start. A database that does not exist stops the start
with "database X does not exist"; one deleted while the daemon runs only
pauses it until it is created again. With http.listen set it serves
/healthz (the process is up), /readyz (in contact with the server and
caught up with the changes feed) and /metrics (Prometheus). Under systemd
(Type=notify) it sends READY=1 once ready, WATCHDOG=1 only while ready,
and STOPPING=1 on a signal, before the drain.

On SIGHUP it reads the configuration file again (with the environment and
--set flags it started with). If it is invalid, it logs why and runs on
unchanged. Otherwise it drains as
for SIGTERM, then starts again with the new configuration in the same
process (systemd: RELOADING=1, then READY=1 once the feed runs again).`,
		Example: `  docstate run --config /etc/docstate/docstate.yaml
  DOCSTATE_ENGINE_WORKERS=8 docstate run --config docstate.yaml --set log.level=debug
  kill -HUP "$(pidof docstate)"    # re-read the configuration: drain, start again`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := g.load(opts)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			// SIGHUP's default action kills the process with no drain:
			// a closed terminal or a "reload" must not do that.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			for {
				next, err := runUntilReload(ctx, cfg, g, opts, cmd, hup)
				if err != nil || next == nil {
					return err
				}
				cfg = *next
			}
		},
	}
}

// errReload is the cause of a run's context when SIGHUP asked for a
// reload rather than a stop.
var errReload = errors.New("reload requested (SIGHUP)")

// runUntilReload runs the daemon with cfg until ctx ends (nil, nil) or a
// SIGHUP brings a configuration that loads (the new one, nil). A SIGHUP
// whose configuration does not load is logged and changes nothing.
func runUntilReload(ctx context.Context, cfg config.Config, g *globals, opts Options, cmd *cobra.Command,
	hup <-chan os.Signal) (*config.Config, error) {
	cycle, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	log := newLogger(cfg, cmd.ErrOrStderr())
	var next *config.Config
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-cycle.Done():
				return
			case <-hup:
			}
			c, err := g.load(opts)
			if err != nil {
				log.Error("SIGHUP: the configuration does not load; running on unchanged", "err", err)
				continue
			}
			next = &c
			cancel(errReload)
			return
		}
	})
	err := run(cycle, cfg, opts, cmd)
	cancel(nil)
	wg.Wait()
	if ctx.Err() != nil || !errors.Is(context.Cause(cycle), errReload) {
		return nil, err
	}
	if err != nil {
		// A reload during the start (provisioning) cancels its requests:
		// that is the reload, not a failure to exit on. A real fault
		// shows again in the next start.
		log.Warn("the run ended with an error during the reload", "err", err)
	}
	log.Info("starting again with the reloaded configuration")
	return next, nil
}

// EngineOptions maps the configuration onto the engine's options
// (handlers.EngineOptions).
func EngineOptions(cfg config.Config) workflow.Options { return handlers.EngineOptions(cfg) }

// SupervisorOptions maps the configuration onto the supervisor's options
// (handlers.SupervisorOptions); false when no patterns are set.
func SupervisorOptions(cfg config.Config) (supervisor.Options, bool) {
	return handlers.SupervisorOptions(cfg)
}

// follower is what run drives: one engine on the database, or in
// many-database mode a supervisor of engines.
type follower interface {
	Run(ctx context.Context) error
	Ready() error
	Stats() workflow.Stats
}

var (
	_ follower = (*workflow.Engine)(nil)
	_ follower = (*supervisor.Supervisor)(nil)
)

// build makes the handler sets, registry and follower for cfg.
func build(cfg config.Config, opts Options, env Env) ([]handlers.Set, *workflow.Registry, follower, error) {
	sets, err := opts.Sets(env)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("handler sets: %w", err)
	}
	reg := workflow.NewRegistry()
	if err := handlers.Register(reg, sets...); err != nil {
		return nil, nil, nil, err
	}
	eopts := EngineOptions(cfg)
	eopts.Logger = env.Logger
	if env.Metrics != nil {
		eopts.OnRun = env.Metrics.OnRun
		eopts.OnFlush = env.Metrics.OnFlush
	}
	if sopts, many := SupervisorOptions(cfg); many {
		sopts.Engine = eopts
		sup, err := supervisor.New(env.Client, reg, sopts)
		if err != nil {
			return nil, nil, nil, err
		}
		return sets, reg, sup, nil
	}
	eng, err := workflow.New(env.DB, reg, eopts)
	if err != nil {
		return nil, nil, nil, err
	}
	return sets, reg, withRunners(eng, sets), nil
}

// withRunners runs the sets that follow more than the engine's database
// beside it (see handlers.Runner); eng alone when there are none.
func withRunners(eng follower, sets []handlers.Set) follower {
	var rs []namedRunner
	for _, s := range sets {
		if r, ok := s.(handlers.Runner); ok {
			rs = append(rs, namedRunner{r, s.Name()})
		}
	}
	if len(rs) == 0 {
		return eng
	}
	return &group{follower: eng, runners: rs}
}

// group is an engine and the sets' runners: it runs them all, returns once
// every one has, and is ready while every one is.
type group struct {
	follower
	runners []namedRunner
}

type namedRunner struct {
	handlers.Runner
	name string
}

func (g *group) Run(ctx context.Context) error {
	// One that fails stops the others: a daemon half running would look
	// healthy while its devices wait.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(g.runners)+1)
	for i, r := range g.runners {
		wg.Go(func() {
			if errs[i+1] = r.Run(ctx); errs[i+1] != nil {
				cancel()
			}
		})
	}
	errs[0] = g.follower.Run(ctx)
	cancel()
	wg.Wait()
	return errors.Join(errs...)
}

func (g *group) Ready() error {
	if err := g.follower.Ready(); err != nil {
		return err
	}
	for _, r := range g.runners {
		if err := r.Ready(); err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
	}
	return nil
}

// watching names what the daemon follows, for logs and systemd's status.
func watching(cfg config.Config) string {
	if p := cfg.Databases.PatternList(); len(p) > 0 {
		return "databases " + strings.Join(p, ",")
	}
	return cfg.Database
}

func run(ctx context.Context, cfg config.Config, opts Options, cmd *cobra.Command) error {
	log := newLogger(cfg, cmd.ErrOrStderr())
	client, db, err := connect(cfg)
	if err != nil {
		return err
	}
	defer client.Close()
	mux := http.NewServeMux()
	var public *http.ServeMux
	if cfg.HTTP.PublicListen != "" {
		public = http.NewServeMux()
	}
	m := metrics.New(version(), metrics.WithEngine(cfg.Engine.Name))
	env := Env{Config: cfg, Client: client, DB: db, Logger: log, Mux: mux, PublicMux: public, Metrics: m}
	sets, reg, eng, err := build(cfg, opts, env)
	if err != nil {
		return err
	}
	m.WatchEngine(cfg.Engine.Name, eng.Stats)
	m.WatchReady(cfg.Engine.Name, eng.Ready)
	if sup, ok := eng.(*supervisor.Supervisor); ok {
		m.WatchSupervisor(cfg.Engine.Name, sup.SupervisorStats)
	}
	mux.Handle("GET /metrics", m.Handler())
	if _, many := SupervisorOptions(cfg); !many {
		if err := atStart(ctx, func() error { return requireDatabase(ctx, client, cfg.Database) }); err != nil {
			return err
		}
	}
	if err := atStart(ctx, func() error { return handlers.Provision(ctx, sets...) }); err != nil {
		return err
	}
	if reg.Len() == 0 {
		log.Warn("no handlers registered: the daemon will follow the feed but do nothing")
	}
	log.Info("docstate starting", "version", version(), "couchdb", cfg.CouchDB.URL, "watching", watching(cfg), "handlers", reg.Len())

	var wg sync.WaitGroup
	defer wg.Wait()
	healCtx, stopHealing := context.WithCancel(ctx)
	defer stopHealing()
	wg.Go(func() { keepProvisioned(healCtx, sets, cfg.Engine.ResyncInterval, log, m) })
	if cfg.HTTP.Listen != "" {
		addHealth(mux, eng)
	}
	for _, l := range []struct {
		key, addr string
		mux       *http.ServeMux
	}{{"http.listen", cfg.HTTP.Listen, mux}, {"http.public_listen", cfg.HTTP.PublicListen, public}} {
		if l.addr == "" {
			continue
		}
		srv, ln, err := listen(l.key, l.addr, l.mux)
		if err != nil {
			return err
		}
		log.Info("http listening", "listener", l.key, "addr", ln.Addr().String())
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server failed", "listener", l.key, "err", err)
			}
		})
		defer func() {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
	}
	// The engine stops on its own context, cancelled only after systemd
	// was told STOPPING=1, so the notice comes before the drain.
	engCtx, stopEngine := context.WithCancel(context.WithoutCancel(ctx))
	defer stopEngine()
	ntf := systemdNotifier(log, eng, watching(cfg))
	wg.Go(func() { ntf.run(engCtx) })
	wg.Go(func() {
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), errReload) {
				log.Info("reload requested (SIGHUP); draining", "timeout", cfg.Engine.DrainTimeout)
				ntf.reloading()
			} else {
				log.Info("stop requested; draining", "timeout", cfg.Engine.DrainTimeout)
				ntf.stopping()
			}
		case <-engCtx.Done():
		}
		stopEngine()
	})
	if err := eng.Run(engCtx); err != nil {
		return err
	}
	log.Info("docstate stopped")
	return nil
}

// atStart runs a start-up step, retrying while the server is away so a
// daemon started before its server still comes up. A missing database is
// not retried: it is a configuration error (or the database has yet to be
// created), and a daemon that waited for it would look healthy to nobody.
func atStart(ctx context.Context, step func() error) error {
	for attempt := 1; ; attempt++ {
		err := step()
		if err == nil || attempt == 5 || errors.Is(err, workflow.ErrNoDatabase) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt) * time.Second):
		}
	}
}

// keepProvisioned provisions the sets again every interval until ctx ends,
// so that what a set provisions and later goes missing or is changed (the
// database deleted and created again, a design document edited by hand) is
// back within one interval, with a warning naming it and
// docstate_provision_repairs_total counting it.
func keepProvisioned(ctx context.Context, sets []handlers.Set, interval time.Duration, log *slog.Logger, m *metrics.Metrics) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		repaired, err := handlers.Repair(ctx, sets...)
		if ctx.Err() != nil {
			return
		}
		for set, what := range repaired {
			m.ProvisionRepaired(set, len(what))
			for _, w := range what {
				log.Warn("provisioning repaired: it was missing or had been changed", "set", set, "what", w)
			}
		}
		m.ProvisionChecked(err != nil)
		if err != nil {
			log.Warn("provisioning check failed; trying again", "err", err, "in", interval)
		}
	}
}

// requireDatabase fails when the configured database does not exist:
// without it the engine could only wait (an engine waits out a database
// deleted under it), and "database was re-created" or a silent wait would
// not tell the operator what is wrong.
func requireDatabase(ctx context.Context, client *kivik.Client, name string) error {
	ok, err := client.DBExists(ctx, name)
	switch {
	case err != nil:
		return fmt.Errorf("database %s: %w", name, err)
	case !ok:
		return fmt.Errorf("%w (create it, or set database to one that exists)", workflow.MissingDatabase(name))
	}
	return nil
}

// addHealth mounts /healthz and /readyz on the private listener. /readyz
// answers 200 "ready" or 503 with the first failing check; /readyz?verbose
// lists every named check ([+] feed ok, [-] devices: reason), as
// controller-runtime's probes do.
func addHealth(mux *http.ServeMux, eng follower) {
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		checks := readinessChecks(eng)
		var b strings.Builder
		failed := ""
		for _, c := range checks {
			if err := c.ready(); err != nil {
				fmt.Fprintf(&b, "[-] %s: %v\n", c.name, err)
				if failed == "" {
					failed = c.name + ": " + err.Error()
				}
				continue
			}
			fmt.Fprintf(&b, "[+] %s ok\n", c.name)
		}
		_, verbose := r.URL.Query()["verbose"]
		if failed != "" {
			if verbose {
				w.WriteHeader(http.StatusServiceUnavailable)
				_, _ = w.Write([]byte(b.String() + "not ready\n"))
				return
			}
			http.Error(w, "not ready: "+failed, http.StatusServiceUnavailable)
			return
		}
		if verbose {
			_, _ = w.Write([]byte(b.String()))
		}
		_, _ = w.Write([]byte("ready\n"))
	})
}

type namedCheck struct {
	name  string
	ready func() error
}

// readinessChecks names what readiness is made of: the feed, and each
// set that follows more (handlers.Runner).
func readinessChecks(eng follower) []namedCheck {
	g, ok := eng.(*group)
	if !ok {
		return []namedCheck{{"feed", eng.Ready}}
	}
	out := []namedCheck{{"feed", g.follower.Ready}}
	for _, r := range g.runners {
		out = append(out, namedCheck{r.name, r.Ready})
	}
	return out
}

// listen opens one of the daemon's listeners.
func listen(key, addr string, mux *http.ServeMux) (*http.Server, net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", key, addr, err)
	}
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln, nil
}
