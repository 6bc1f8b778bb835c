package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

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
replayed at the next start. With http.listen set it serves /healthz (the
process is up), /readyz (the changes feed is healthy) and /metrics
(Prometheus). Under systemd (Type=notify) it sends READY=1 once the feed
runs, WATCHDOG=1 only while the feed is healthy, and STOPPING=1 on a
signal, before the drain.`,
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
		FeedBatch:          e.FeedBatch,
		FeedLinger:         e.FeedLinger,
		MaxPending:         e.MaxPending,
		MaxDocBytes:        e.MaxDocBytes,
		MaxPendingBytes:    e.MaxPendingBytes,
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
	if err := provision(ctx, sets); err != nil {
		return err
	}
	if reg.Len() == 0 {
		log.Warn("no handlers registered: the daemon will follow the feed but do nothing")
	}
	log.Info("docstate starting", "version", version(), "couchdb", cfg.CouchDB.URL, "watching", watching(cfg), "handlers", reg.Len())

	var wg sync.WaitGroup
	defer wg.Wait()
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

// provision prepares the database for the sets, retrying while the server
// is away so a daemon started before its database still comes up.
func provision(ctx context.Context, sets []handlers.Set) error {
	for attempt := 1; ; attempt++ {
		err := handlers.Provision(ctx, sets...)
		if err == nil || attempt == 5 {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt) * time.Second):
		}
	}
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
