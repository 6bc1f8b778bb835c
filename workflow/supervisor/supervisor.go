package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/internal/budget"
	"github.com/docstate/docstate/workflow/internal/supervised"
)

// Options configure many-database mode. Zero values take the
// defaults named per field.
type Options struct {
	// Patterns select the databases to watch: path.Match globs over
	// database names, e.g. "userctl-*". System databases (starting with
	// "_") never match.
	Patterns []string
	// MaxOpen bounds the engines running at once, hence the feeds and
	// their connections (default 32). Databases with work wait their turn.
	MaxOpen int
	// DiscoveryInterval is how often _all_dbs is listed and each watched
	// database's update_seq compared with the one its engine left it at
	// (default 10s): work is noticed within it. Where the server has
	// /_db_updates, changed databases are checked as the feed names them,
	// and the full listing only runs every 10 intervals, as a catch-up.
	DiscoveryInterval time.Duration
	// IdleStop stops an engine that had nothing to do for this long
	// (default 30s); its checkpoint is saved and its next due time kept.
	IdleStop time.Duration
	// Turn is how long an engine may keep its slot while other databases
	// wait for one (default 1m); it yields and queues again behind them.
	Turn time.Duration
	// Engine configures each database's engine. Its Logger is the
	// supervisor's too.
	Engine workflow.Options
	// Concurrency bounds the database info requests of one discovery
	// (default 8).
	Concurrency int
	// Shard and Shards split the databases between daemons by a stable
	// hash of the name: this daemon watches those whose hash modulo Shards
	// is Shard. Shards 0 or 1 watches all. Daemons then never race for the
	// same database, but a shard whose daemon is down waits for it.
	Shard, Shards int
}

func (o *Options) setDefaults() error {
	if o.MaxOpen == 0 {
		o.MaxOpen = 32
	}
	if o.DiscoveryInterval == 0 {
		o.DiscoveryInterval = 10 * time.Second
	}
	if o.IdleStop == 0 {
		o.IdleStop = 30 * time.Second
	}
	if o.Turn == 0 {
		o.Turn = time.Minute
	}
	if o.Concurrency == 0 {
		o.Concurrency = 8
	}
	var errs []error
	if len(o.Patterns) == 0 {
		errs = append(errs, errors.New("at least one database pattern is required"))
	}
	for _, p := range o.Patterns {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			errs = append(errs, fmt.Errorf("database pattern %q is not a valid glob", p))
		}
	}
	if o.Shards > 1 && (o.Shard < 0 || o.Shard >= o.Shards) {
		errs = append(errs, fmt.Errorf("shard %d must be in 0..%d", o.Shard, o.Shards-1))
	}
	if o.MaxOpen < 1 || o.Concurrency < 1 || o.DiscoveryInterval < 10*time.Millisecond || o.IdleStop <= 0 || o.Turn <= 0 {
		errs = append(errs, errors.New("max open and concurrency must be positive, intervals positive"))
	}
	return errors.Join(errs...)
}

// Supervisor runs the handlers over many databases: one engine per
// database with work, at most MaxOpen at once. It learns which databases
// changed from the server's /_db_updates feed where there is one (Apache
// CouchDB), checking only the databases it names, and otherwise by listing
// _all_dbs and comparing each matching database's update_seq with the one
// its engine left it at (PouchDB Server). The listing also runs, less
// often, beside the feed: it catches up on whatever a feed gap missed. Each
// database keeps its own checkpoint; an engine stopped while documents
// wait for a timer (a retry, a wake-up) is started again when the earliest
// is due, and the due time is stored in the database's
// _local/docstate-<name>-due document so a restart of the daemon keeps it.
type Supervisor struct {
	client *kivik.Client
	reg    *workflow.Registry
	opts   Options
	log    *slog.Logger

	mu      sync.Mutex
	dbs     map[string]*watchedDB
	waiting []string
	running map[string]*runningDB
	// finished holds the summed counters of engines that stopped.
	finished workflow.Stats

	exited chan string
	// wake tells the loop that databases were queued: fill the slots.
	wake chan struct{}
	// dirty holds databases /_db_updates named since discovery last
	// checked them (under mu); checkDirty wakes discovery for them, and
	// catchUp asks for a full listing (after a feed gap).
	dirty      map[string]bool
	checkDirty chan struct{}
	catchUp    chan struct{}
	mode       atomic.Pointer[string]
	// lastScan is when discovery last succeeded (unix ns); scanErr the
	// last discovery error, nil after a success.
	lastScan atomic.Int64
	scanErr  atomic.Pointer[error]

	scans, started, stopped, maxRunning atomic.Int64
	// budget is the byte budget (Options.MaxPendingBytes) all engines
	// share: a burst of large documents across many databases is bounded
	// once, not per database.
	budget *budget.Budget
}

// watchedDB is what the supervisor remembers of one database.
type watchedDB struct {
	seen    string    // update_seq when its engine last stopped caught up ("" unknown)
	due     time.Time // when a stopped engine's earliest timer is due
	waiting bool      // in the waiting list
	// recheck is set when /_db_updates named the database while it was
	// settling: it is checked again once settled.
	recheck bool
	// scanned is set once an engine of this process finished its start
	// scan here: later engines only scan for due documents. Between them
	// the checkpoint covers finished work, and anything unfinished is
	// after it in the feed or has a due time.
	scanned bool
	// stored is the due time _local/docstate-<name>-due holds, once
	// known (storedKnown): an unchanged one is not read or written again.
	stored      time.Time
	storedKnown bool
	// settling is set while a stopped engine's leavings (update_seq, due
	// time) are being recorded: discovery leaves the database alone then.
	settling bool
}

type runningDB struct {
	eng      *workflow.Engine
	hooks    *supervised.Hooks // what it shares with the supervisor
	cancel   context.CancelFunc
	started  time.Time
	idle     time.Time // since when it has had nothing to do (zero: busy)
	yield    bool      // stopped to give its slot to others
	stopping bool      // cancelled; nextDue is set
	nextDue  time.Time // its earliest timer, read as it was stopped
}

// New checks opts and returns a supervisor of the databases of client (an
// admin client: it lists _all_dbs) matching opts.Patterns.
func New(client *kivik.Client, reg *workflow.Registry, opts Options) (*Supervisor, error) {
	if client == nil || reg == nil {
		return nil, errors.New("supervisor: client and registry are required")
	}
	err := opts.setDefaults()
	// The engine options are checked, and their defaults filled in, the
	// way every engine will: by making one (workflow.New sends no
	// request). Every engine then runs with the same options, the same
	// Owner included.
	if eng, engErr := workflow.New(client.DB("docstate-options-check"), reg, opts.Engine); engErr != nil {
		err = errors.Join(err, engErr)
	} else {
		opts.Engine = eng.Options()
	}
	if err != nil {
		return nil, fmt.Errorf("workflow supervisor options: %w", err)
	}
	return &Supervisor{
		budget: budget.New(int64(opts.Engine.MaxPendingBytes)),
		client: client, reg: reg, opts: opts,
		log:     opts.Engine.Logger.With("engine", opts.Engine.Name),
		dbs:     map[string]*watchedDB{},
		running: map[string]*runningDB{},
		exited:  make(chan string, opts.MaxOpen),
		wake:    make(chan struct{}, 1),
		dirty:   map[string]bool{},

		checkDirty: make(chan struct{}, 1),
		catchUp:    make(chan struct{}, 1),
	}, nil
}

// Run watches the databases until ctx ends, then stops every engine (each
// drains and saves its checkpoint) and returns nil.
//
// The loop that starts and stops engines never waits on the server:
// discovery (hundreds of requests for as many databases) runs beside it,
// and what a stopped engine leaves is recorded beside it too, so a freed
// slot is filled at once.
func (s *Supervisor) Run(ctx context.Context) error {
	since, feed := s.probeDBUpdates(ctx)
	if ctx.Err() != nil {
		return nil
	}
	var engines, helpers sync.WaitGroup
	defer engines.Wait()
	defer helpers.Wait()
	full := s.opts.DiscoveryInterval
	if feed {
		full *= 10
		s.setMode(DiscoveryDBUpdates)
		s.log.Info("many-database mode: discovery by /_db_updates, with an _all_dbs catch-up",
			"patterns", s.opts.Patterns, "max_open", s.opts.MaxOpen, "catch_up_interval", full)
		helpers.Go(func() { s.followDBUpdates(ctx, since) })
		helpers.Go(func() { s.dirtyLoop(ctx) })
	} else {
		s.setMode(DiscoveryAllDBs)
		s.log.Info("many-database mode: discovery by _all_dbs and update_seq",
			"patterns", s.opts.Patterns, "max_open", s.opts.MaxOpen, "interval", full)
	}
	helpers.Go(func() { s.listLoop(ctx, full, feed) })
	// Idle engines are looked for often: a slot held by an engine with
	// nothing to do is a slot another database waits for.
	tick := time.NewTicker(min(100*time.Millisecond, s.opts.IdleStop/2))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			s.mu.Lock()
			for _, r := range s.running {
				r.cancel()
			}
			s.mu.Unlock()
			return nil
		case <-s.wake:
		case <-tick.C:
			s.reap()
		case name := <-s.exited:
			s.onExit(ctx, name, &helpers)
		}
		s.fill(ctx, &engines)
	}
}

// enqueue puts name at the back of the waiting list, once.
func (s *Supervisor) enqueue(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.dbs[name]
	if w == nil || w.waiting {
		return
	}
	w.waiting = true
	s.waiting = append(s.waiting, name)
	select {
	case s.wake <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// fill starts engines for waiting databases while slots are free.
func (s *Supervisor) fill(ctx context.Context, engines *sync.WaitGroup) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ctx.Err() == nil && len(s.running) < s.opts.MaxOpen && len(s.waiting) > 0 {
		name := s.waiting[0]
		s.waiting = s.waiting[1:]
		w := s.dbs[name]
		if w == nil {
			continue // gone meanwhile
		}
		w.waiting = false
		opts := s.opts.Engine
		opts.Logger = s.opts.Engine.Logger
		opts.NoStartScan = opts.NoStartScan || w.scanned
		// Engines come and go with their databases' work here, so a
		// membership document per database would churn: many databases
		// are split by name (Shards) instead.
		opts.Members = false
		eng, err := workflow.New(s.client.DB(name), s.reg, opts)
		if err != nil {
			s.log.Error("cannot start engine", "db", name, "err", err)
			continue
		}
		hooks := &supervised.Hooks{Budget: s.budget, Own: &supervised.OwnWrites{}}
		ectx, cancel := context.WithCancel(supervised.With(ctx, hooks))
		r := &runningDB{eng: eng, hooks: hooks, cancel: cancel, started: time.Now()}
		s.running[name] = r
		s.started.Add(1)
		if n := int64(len(s.running)); n > s.maxRunning.Load() {
			s.maxRunning.Store(n)
		}
		engines.Go(func() {
			if err := eng.Run(ectx); err != nil {
				s.log.Warn("engine stopped with an error", "db", name, "err", err)
			}
			s.exited <- name
		})
	}
}

// reap stops engines idle for IdleStop, and engines past their turn while
// others wait.
func (s *Supervisor) reap() {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, r := range s.running {
		idle := r.eng.Idle()
		switch {
		case !idle:
			r.idle = time.Time{}
		case r.idle.IsZero():
			r.idle = now
		}
		// An idle engine keeps its slot for IdleStop, in case more comes;
		// not while other databases wait for one.
		stop := idle && (now.Sub(r.idle) >= s.opts.IdleStop || len(s.waiting) > 0)
		if !stop && len(s.waiting) > 0 && now.Sub(r.started) >= s.opts.Turn {
			stop, r.yield = true, true
		}
		if stop && !r.stopping {
			r.stopping, r.nextDue = true, r.eng.NextDue()
			s.log.Debug("stopping engine", "db", name, "idle", !r.idle.IsZero(), "yield", r.yield)
			r.cancel()
		}
	}
}

// onExit frees a stopped engine's slot and records, beside the loop, what
// it left: the database's update_seq as it stopped (a later scan compares
// against it) and its earliest due time.
func (s *Supervisor) onExit(ctx context.Context, name string, helpers *sync.WaitGroup) {
	s.mu.Lock()
	r := s.running[name]
	delete(s.running, name)
	w := s.dbs[name]
	if r != nil && w != nil && r.hooks.StartScanned {
		w.scanned = true
	}
	if r != nil {
		s.stopped.Add(1)
		addStats(&s.finished, r.eng.Stats())
		// Gauges describe running engines only.
		s.finished.Inflight, s.finished.Queued, s.finished.Delayed, s.finished.Pending, s.finished.ClaimsWaiting = 0, 0, 0, 0, 0
	}
	if r == nil || w == nil || ctx.Err() != nil {
		s.mu.Unlock()
		return
	}
	w.settling = true
	s.mu.Unlock()
	helpers.Go(func() { s.settle(ctx, name, w, r) })
}
