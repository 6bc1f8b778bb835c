package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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
)

func newRunCmd(g *globals, opts Options) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon until SIGINT or SIGTERM",
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
and STOPPING=1 on a signal, before the drain.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := g.load(opts)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return run(ctx, cfg, opts, cmd)
		},
	}
}

// EngineOptions maps the configuration onto the engine's options.
func EngineOptions(cfg config.Config) workflow.Options {
	e := cfg.Engine
	return workflow.Options{
		Name:               e.Name,
		Owner:              e.Owner,
		Workers:            e.Workers,
		BatchSize:          e.BatchSize,
		BatchLinger:        e.BatchLinger,
		HandlerTimeout:     e.HandlerTimeout,
		Lease:              e.Lease,
		MaxAttempts:        e.MaxAttempts,
		RetryBase:          e.RetryBase,
		RetryMax:           e.RetryMax,
		FeedTimeout:        e.FeedTimeout,
		FeedHeartbeat:      e.FeedHeartbeat,
		FeedBatch:          e.FeedBatch,
		FeedLinger:         e.FeedLinger,
		MaxPending:         e.MaxPending,
		CheckpointInterval: e.CheckpointInterval,
		ResyncInterval:     e.ResyncInterval,
		NoStartScan:        !e.FullResyncOnStart,
		DrainTimeout:       e.DrainTimeout,
	}
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
	_ follower = (*workflow.Supervisor)(nil)
)

// SupervisorOptions maps the configuration onto many-database mode's
// options; ok is false in single-database mode.
func SupervisorOptions(cfg config.Config) (workflow.SupervisorOptions, bool) {
	d := cfg.Databases
	patterns := d.PatternList()
	return workflow.SupervisorOptions{
		Patterns:          patterns,
		MaxOpen:           d.MaxOpen,
		DiscoveryInterval: d.DiscoveryInterval,
		IdleStop:          d.IdleStop,
		Turn:              d.Turn,
		Shard:             d.Shard,
		Shards:            d.Shards,
		Engine:            EngineOptions(cfg),
	}, len(patterns) > 0
}

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
	if env.metrics != nil {
		eopts.OnRun = env.metrics.OnRun
		eopts.OnFlush = env.metrics.OnFlush
	}
	if sopts, many := SupervisorOptions(cfg); many {
		sopts.Engine = eopts
		sup, err := workflow.NewSupervisor(env.Client, reg, sopts)
		if err != nil {
			return nil, nil, nil, err
		}
		return sets, reg, sup, nil
	}
	eng, err := workflow.New(env.DB, reg, eopts)
	if err != nil {
		return nil, nil, nil, err
	}
	return sets, reg, eng, nil
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
	m := metrics.New(version(), metrics.WithEngine(cfg.Engine.Name))
	env := Env{Config: cfg, Client: client, DB: db, Logger: log, Mux: mux, metrics: m}
	sets, reg, eng, err := build(cfg, opts, env)
	if err != nil {
		return err
	}
	m.WatchEngine(cfg.Engine.Name, eng.Stats)
	m.WatchReady(cfg.Engine.Name, eng.Ready)
	if sup, ok := eng.(*workflow.Supervisor); ok {
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
		srv, ln, err := listen(cfg.HTTP.Listen, mux, eng)
		if err != nil {
			return err
		}
		log.Info("http listening", "addr", ln.Addr().String())
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server failed", "err", err)
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
			log.Info("stop requested; draining", "timeout", cfg.Engine.DrainTimeout)
			ntf.stopping()
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

// listen opens the listener for health checks and the sets' pages.
func listen(addr string, mux *http.ServeMux, eng follower) (*http.Server, net.Listener, error) {
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := eng.Ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("http.listen %s: %w", addr, err)
	}
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln, nil
}
