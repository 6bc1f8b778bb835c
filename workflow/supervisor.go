package workflow

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"path"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// SupervisorOptions configure many-database mode. Zero values take the
// defaults named per field.
type SupervisorOptions struct {
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
	Engine Options
	// Concurrency bounds the database info requests of one discovery
	// (default 8).
	Concurrency int
	// Shard and Shards split the databases between daemons by a stable
	// hash of the name: this daemon watches those whose hash modulo Shards
	// is Shard. Shards 0 or 1 watches all. Daemons then never race for the
	// same database, but a shard whose daemon is down waits for it.
	Shard, Shards int
}

func (o *SupervisorOptions) setDefaults() error {
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
	if err := o.Engine.setDefaults(); err != nil {
		errs = append(errs, err)
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
	reg    *Registry
	opts   SupervisorOptions
	log    *slog.Logger

	mu      sync.Mutex
	dbs     map[string]*watchedDB
	waiting []string
	running map[string]*runningDB
	// finished holds the summed counters of engines that stopped.
	finished Stats

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
	budget *byteBudget
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
	eng      *Engine
	cancel   context.CancelFunc
	started  time.Time
	idle     time.Time // since when it has had nothing to do (zero: busy)
	yield    bool      // stopped to give its slot to others
	stopping bool      // cancelled; nextDue is set
	nextDue  time.Time // its earliest timer, read as it was stopped
}

// NewSupervisor checks opts and returns a supervisor of the databases of
// client (an admin client: it lists _all_dbs) matching opts.Patterns.
func NewSupervisor(client *kivik.Client, reg *Registry, opts SupervisorOptions) (*Supervisor, error) {
	if client == nil || reg == nil {
		return nil, errors.New("workflow: client and registry are required")
	}
	if err := opts.setDefaults(); err != nil {
		return nil, fmt.Errorf("workflow supervisor options: %w", err)
	}
	// The engines' options as each engine will see them, for the shared
	// budget's size; an error here is New's to report for each engine.
	engineOpts := opts.Engine
	_ = engineOpts.setDefaults()
	return &Supervisor{
		budget: newByteBudget(int64(engineOpts.MaxPendingBytes)),
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

// Matches reports whether the supervisor watches database name: it
// matches a pattern and falls in this daemon's shard.
func (s *Supervisor) Matches(name string) bool {
	return MatchDatabase(s.opts.Patterns, name) && (s.opts.Shards <= 1 || ShardOf(name, s.opts.Shards) == s.opts.Shard)
}

// ShardOf is the shard of database name among shards: FNV-1a of the name
// modulo shards, the same on every daemon and every start.
func ShardOf(name string, shards int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	return int(h.Sum32() % uint32(shards))
}

// MatchDatabase reports whether database name matches one of the
// path.Match globs; system databases (starting with "_") never do.
func MatchDatabase(patterns []string, name string) bool {
	if name == "" || name[0] == '_' {
		return false
	}
	for _, p := range patterns {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
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

// discover lists the databases, drops the ones gone, and queues those
// whose update_seq moved since their engine left them, or whose earliest
// due time passed. Databases whose engine runs are not asked: their feed
// sees their changes. concurrency bounds the info requests at once.
func (s *Supervisor) discover(ctx context.Context, concurrency int) {
	s.scans.Add(1)
	names, err := s.client.AllDBs(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.scanErr.Store(&err)
			s.log.Warn("database discovery failed", "err", err)
		}
		return
	}
	var matched []string
	present := make(map[string]bool, len(names))
	s.mu.Lock()
	for _, n := range names {
		if s.Matches(n) {
			present[n] = true
			if s.running[n] == nil {
				matched = append(matched, n)
			}
		}
	}
	var gone []string
	for name := range s.dbs {
		if !present[name] {
			gone = append(gone, name)
		}
	}
	s.mu.Unlock()
	for _, name := range gone {
		s.drop(name)
	}
	failed := s.check(ctx, matched, concurrency)
	if ctx.Err() != nil {
		return
	}
	if failed > 0 {
		err := fmt.Errorf("%d of %d databases could not be read", failed, len(present))
		s.scanErr.Store(&err)
		s.log.Warn("database discovery incomplete", "err", err)
	} else {
		s.scanErr.Store(nil)
	}
	s.lastScan.Store(time.Now().UnixNano())
}

// check reads each named database's update_seq, a bounded number of
// requests at a time, and queues those whose update_seq moved since their
// engine left them, or whose earliest due time passed. A database that is
// gone is dropped. It returns how many could not be read.
func (s *Supervisor) check(ctx context.Context, matched []string, concurrency int) (failed int) {
	type info struct {
		name, seq string
		err       error
		first     bool      // not known before: firstLook ran
		idle      bool      // firstLook found nothing to do
		due       time.Time // firstLook's stored due time
	}
	work := make(chan string)
	results := make(chan info)
	var askers sync.WaitGroup
	for range concurrency {
		askers.Go(func() {
			for name := range work {
				st, err := s.client.DB(name).Stats(ctx)
				r := info{name: name, err: err}
				if err == nil {
					r.seq = st.UpdateSeq
					s.mu.Lock()
					_, known := s.dbs[name]
					s.mu.Unlock()
					if !known {
						r.first = true
						r.idle, r.due = s.firstLook(ctx, name)
					}
				}
				results <- r
			}
		})
	}
	go func() {
		defer close(work)
		for _, n := range matched {
			select {
			case work <- n:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { askers.Wait(); close(results) }()
	now := time.Now()
	for r := range results {
		if r.err != nil {
			if couch.IsNotFound(r.err) {
				s.drop(r.name)
			} else {
				failed++
			}
			continue
		}
		s.mu.Lock()
		w, known := s.dbs[r.name]
		_, running := s.running[r.name]
		if !known {
			if !r.first {
				// Dropped as gone meanwhile: the next discovery decides.
				s.mu.Unlock()
				continue
			}
			// First sight (at start, or a new database): it has work if
			// changes follow its checkpoint or its stored due time passed.
			w = &watchedDB{}
			if r.idle {
				// firstLook read the stored due time: it is known.
				w.seen, w.due = r.seq, r.due
				w.stored, w.storedKnown = r.due.UTC().Truncate(time.Millisecond), true
			}
			s.dbs[r.name] = w
		}
		if w.settling {
			w.recheck = true
		}
		pending := !w.settling && (w.seen != r.seq || (!w.due.IsZero() && !w.due.After(now)))
		s.mu.Unlock()
		if pending && !running {
			s.enqueue(r.name)
		}
	}
	return failed
}

// drop forgets a database that is gone and stops its engine.
func (s *Supervisor) drop(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.dbs[name]; !ok {
		return
	}
	s.log.Info("database gone; no longer watched", "db", name)
	delete(s.dbs, name)
	if r := s.running[name]; r != nil {
		r.cancel()
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
		eng, err := New(s.client.DB(name), s.reg, opts)
		if err != nil {
			s.log.Error("cannot start engine", "db", name, "err", err)
			continue
		}
		eng.own = &ownWrites{}
		eng.setBudget(s.budget)
		ectx, cancel := context.WithCancel(ctx)
		r := &runningDB{eng: eng, cancel: cancel, started: time.Now()}
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
	if r != nil && w != nil && r.eng.startScanned.Load() {
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

// settle records what a stopped engine left; see onExit.
func (s *Supervisor) settle(ctx context.Context, name string, w *watchedDB, r *runningDB) {
	due := r.nextDue
	// Caught up: remember the update_seq now, so only a change after this
	// starts it again. A yielded engine still has work: queue it again.
	var seq string
	if st, err := s.client.DB(name).Stats(ctx); err == nil && !r.yield {
		seq = st.UpdateSeq
	}
	s.saveDue(ctx, name, w, due)
	// A change written after the engine's last look and before the
	// update_seq above was read would hide behind it: the changes after
	// the engine's final checkpoint show it (read after the update_seq,
	// so whatever comes later moves the update_seq instead).
	if seq != "" {
		cp := r.eng.cp.savedSeq()
		if others, err := s.othersChanges(ctx, s.client.DB(name), cp, r.eng); cp == "" || err != nil || others {
			seq = ""
		}
	}
	s.mu.Lock()
	w.seen, w.due, w.settling = seq, due, false
	recheck := w.recheck
	w.recheck = false
	s.mu.Unlock()
	if r.yield || seq == "" {
		s.enqueue(name)
	} else if recheck {
		s.markDirty(name)
	}
}

// dueDocID keeps a stopped engine's earliest due time in its database.
func dueDocID(name string) string { return checkpointID(name) + "-due" }

// saveDue stores (or clears) the earliest due time of a database whose
// engine stopped, so that a restarted daemon starts its engine in time.
func (s *Supervisor) saveDue(ctx context.Context, name string, w *watchedDB, due time.Time) {
	due = due.UTC().Truncate(time.Millisecond)
	s.mu.Lock()
	same := w.storedKnown && w.stored.Equal(due)
	s.mu.Unlock()
	if same {
		return // most stops: no timer before, none now
	}
	db := s.client.DB(name)
	id := dueDocID(s.opts.Engine.Name)
	var cur struct {
		Rev string `json:"_rev"`
		Due *Stamp `json:"due"`
	}
	err := db.Get(ctx, id).ScanDoc(&cur)
	if err != nil && !couch.IsNotFound(err) {
		return
	}
	if !cur.Due.time().Equal(due) || (cur.Rev == "" && !due.IsZero()) {
		doc := map[string]any{"due": stamp(due)}
		if cur.Rev != "" {
			doc["_rev"] = cur.Rev
		}
		if _, err := db.Put(ctx, id, doc); err != nil {
			s.log.Debug("due time not saved", "db", name, "err", err)
			return
		}
	}
	s.mu.Lock()
	w.stored, w.storedKnown = due, true
	s.mu.Unlock()
}

// othersChanges reports whether a change follows seq in db that eng (nil:
// no engine) did not write itself. An engine stops as soon as its work is
// done, often before the feed brought back its last writes; those rows are
// after its checkpoint but are no work, and starting an engine for them
// would only find that out. More than a page of rows counts as work.
func (s *Supervisor) othersChanges(ctx context.Context, db *kivik.DB, seq string, eng *Engine) (bool, error) {
	const page = 100
	rows := db.Changes(ctx, kivik.Params(map[string]any{"since": seq, "limit": page}))
	defer rows.Close()
	n := 0
	for ch, err := range rows.Iterator() {
		if err != nil {
			return false, err
		}
		n++
		if eng == nil || len(ch.Changes) == 0 || !eng.own.wrote(ch.ID, ch.Changes[0]) {
			return true, nil
		}
	}
	return n >= page, nil
}

// firstLook decides whether a database seen for the first time needs an
// engine: not when no change follows its checkpoint (the checkpoint only
// passes finished work) and its stored due time, returned, has not come.
func (s *Supervisor) firstLook(ctx context.Context, name string) (idle bool, due time.Time) {
	db := s.client.DB(name)
	var cp checkpointDoc
	if err := db.Get(ctx, checkpointID(s.opts.Engine.Name)).ScanDoc(&cp); err != nil || cp.Seq == "" {
		return false, time.Time{}
	}
	if more, err := s.othersChanges(ctx, db, cp.Seq, nil); err != nil || more {
		return false, time.Time{}
	}
	var stored struct {
		Due *Stamp `json:"due"`
	}
	if err := db.Get(ctx, dueDocID(s.opts.Engine.Name)).ScanDoc(&stored); err != nil && !couch.IsNotFound(err) {
		return false, time.Time{}
	}
	return true, stored.Due.time()
}

// Ready reports whether discovery works: the last one succeeded within
// three intervals (plus the feed deadline's slack).
func (s *Supervisor) Ready() error {
	last := s.lastScan.Load()
	if last == 0 {
		return errors.New("databases not discovered yet")
	}
	if err := s.scanErr.Load(); err != nil {
		return fmt.Errorf("database discovery is failing: %w", *err)
	}
	if age, limit := time.Since(time.Unix(0, last)), 3*s.opts.DiscoveryInterval+30*time.Second; age > limit {
		return fmt.Errorf("no successful database discovery for %v", age.Round(time.Second))
	}
	return nil
}

// SupervisorStats describes the many-database mode now.
type SupervisorStats struct {
	Watched    int    // databases matching the patterns
	Open       int    // engines (feeds) running now
	MaxOpen    int64  // the most engines that ran at once
	Waiting    int    // databases with work waiting for a slot
	Scans      int64  // discoveries
	Started    int64  // engines started
	Stopped    int64  // engines stopped (idle, yielded or database gone)
	Discovery  string // DiscoveryAllDBs or DiscoveryDBUpdates; "" before Run decided
	LastSweep  time.Time
	EngineSums Stats // every engine's counters summed, stopped ones included
}

// SupervisorStats returns the supervisor's counters now.
func (s *Supervisor) SupervisorStats() SupervisorStats {
	s.mu.Lock()
	st := SupervisorStats{
		Watched: len(s.dbs), Open: len(s.running), Waiting: len(s.waiting),
		MaxOpen: s.maxRunning.Load(), Scans: s.scans.Load(), Started: s.started.Load(), Stopped: s.stopped.Load(),
		Discovery: s.Mode(), EngineSums: s.finished,
	}
	for _, r := range s.running {
		addStats(&st.EngineSums, r.eng.Stats())
	}
	s.mu.Unlock()
	// One budget for all: its gauge is not a sum.
	st.EngineSums.PendingBytes, st.EngineSums.PendingBytesPeak = s.budget.stats()
	if t := s.lastScan.Load(); t != 0 {
		st.LastSweep = time.Unix(0, t)
	}
	return st
}

// Stats returns every engine's counters summed, stopped ones included, so
// metrics built for one engine describe the whole supervisor. Gauges
// (Inflight, Queued, Delayed, Pending) cover the running engines only.
func (s *Supervisor) Stats() Stats {
	st := s.SupervisorStats()
	return st.EngineSums
}

// addStats adds b's counters to a. Gauges are added too: the caller sums
// running engines only into a fresh Stats for those to be right.
func addStats(a *Stats, b Stats) {
	a.ChangesReceived += b.ChangesReceived
	a.Runs += b.Runs
	a.RunErrors += b.RunErrors
	a.Panics += b.Panics
	a.Transitions += b.Transitions
	a.Noops += b.Noops
	a.Conflicts += b.Conflicts
	a.ClaimsWon += b.ClaimsWon
	a.ClaimsLost += b.ClaimsLost
	a.ClaimsHeld += b.ClaimsHeld
	a.ClaimsTakenOver += b.ClaimsTakenOver
	a.ClaimsExpired += b.ClaimsExpired
	a.ResultsDropped += b.ResultsDropped
	a.ClaimsUnproven += b.ClaimsUnproven
	a.ClaimsProven += b.ClaimsProven
	a.ClaimsYielded += b.ClaimsYielded
	a.BranchesRemoved += b.BranchesRemoved
	a.ConflictsWaiting += b.ConflictsWaiting
	a.SeqRewinds += b.SeqRewinds
	a.RetriesScheduled += b.RetriesScheduled
	a.Failed += b.Failed
	a.Invalid += b.Invalid
	a.Skipped += b.Skipped
	a.Transient += b.Transient
	a.FeedRequests += b.FeedRequests
	a.FeedErrors += b.FeedErrors
	a.FeedResets += b.FeedResets
	a.CheckpointsSaved += b.CheckpointsSaved
	a.ResyncQueued += b.ResyncQueued
	a.Batches += b.Batches
	a.BatchedWrites += b.BatchedWrites
	a.ClaimsRenewed += b.ClaimsRenewed
	a.ClaimsReleased += b.ClaimsReleased
	a.ClaimsWaiting += b.ClaimsWaiting
	a.Inflight += b.Inflight
	a.Queued += b.Queued
	a.Delayed += b.Delayed
	a.Pending += b.Pending
	a.Oversized += b.Oversized
	if b.CheckpointSaved.After(a.CheckpointSaved) {
		a.CheckpointSaved = b.CheckpointSaved
	}
	if b.FeedContact.After(a.FeedContact) {
		a.FeedContact = b.FeedContact
	}
}

// String names the watched databases' count, for logs.
func (s SupervisorStats) String() string {
	return strconv.Itoa(s.Watched) + " databases, " + strconv.Itoa(s.Open) + " open"
}

// Discovery modes, as SupervisorStats.Discovery and the start log name them.
const (
	DiscoveryAllDBs    = "all_dbs"
	DiscoveryDBUpdates = "db_updates"
)

func (s *Supervisor) setMode(m string) { s.mode.Store(&m) }

// Mode returns the discovery mode in use: DiscoveryDBUpdates where the
// server has /_db_updates, DiscoveryAllDBs otherwise; "" until Run has
// asked the server.
func (s *Supervisor) Mode() string {
	if m := s.mode.Load(); m != nil {
		return *m
	}
	return ""
}

// listLoop lists every database now and every full interval (and at once
// after a /_db_updates gap). Beside the feed (gentle) the listing is only a
// catch-up: after the first it asks a quarter as many databases at once,
// so it does not crowd out the engines' requests.
func (s *Supervisor) listLoop(ctx context.Context, full time.Duration, gentle bool) {
	concurrency := s.opts.Concurrency
	for {
		// Start to start: a listing that takes a while (thousands of
		// databases) does not stretch the interval work waits for.
		began := time.Now()
		s.discover(ctx, concurrency)
		if gentle {
			concurrency = max(1, s.opts.Concurrency/4)
		}
		timer := time.NewTimer(time.Until(began.Add(full)))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		case <-s.catchUp:
			timer.Stop()
		}
	}
}

// dirtyLoop checks the databases /_db_updates named, beside the listing.
func (s *Supervisor) dirtyLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.checkDirty:
		}
		s.mu.Lock()
		names := make([]string, 0, len(s.dirty))
		for n := range s.dirty {
			// A running engine's own feed sees the change; one stopping
			// checks the changes after its checkpoint as it settles.
			// Most events of a busy database are its engine's own
			// writes: no request for those.
			if s.running[n] == nil {
				names = append(names, n)
			}
		}
		clear(s.dirty)
		s.mu.Unlock()
		s.check(ctx, names, s.opts.Concurrency)
	}
}

// markDirty asks discovery to check database name soon.
func (s *Supervisor) markDirty(name string) {
	s.mu.Lock()
	s.dirty[name] = true
	s.mu.Unlock()
	select {
	case s.checkDirty <- struct{}{}:
	default:
	}
}

// probeDBUpdates asks the server for /_db_updates once. It reports whether
// the feed works and the seq it starts from. A server that answers with an
// error (PouchDB Server: 400; CouchDB without _global_changes: an error
// too) has no usable feed; a server that does not answer is asked again,
// since the listing could not work either.
func (s *Supervisor) probeDBUpdates(ctx context.Context) (since string, ok bool) {
	for failures := 1; ctx.Err() == nil; failures++ {
		since, err := s.pollDBUpdates(ctx, "now", "normal", nil)
		if err == nil {
			return since, true
		}
		if kivik.HTTPStatus(err) != 0 || ctx.Err() != nil {
			s.log.Info("no usable /_db_updates on this server; discovery lists _all_dbs", "reason", err)
			return "", false
		}
		d := backoff(failures, s.opts.Engine.FeedRetryMin, s.opts.Engine.FeedRetryMax)
		s.log.Warn("server unreachable while asking for /_db_updates; asking again", "err", err, "in", d.Round(time.Millisecond))
		if !sleep(ctx, d) {
			break
		}
	}
	return "", false
}

// pollDBUpdates makes one /_db_updates request and hands each matching
// database's name to each. It returns the seq to continue from.
func (s *Supervisor) pollDBUpdates(ctx context.Context, since, feed string, each func(name string)) (string, error) {
	timeout := s.opts.Engine.FeedTimeout
	reqCtx, cancel := context.WithTimeout(ctx, timeout+timeout/2+5*time.Second)
	defer cancel()
	rows := s.client.DBUpdates(reqCtx, kivik.Params(map[string]any{
		"feed": feed, "since": since, "timeout": strconv.FormatInt(timeout.Milliseconds(), 10),
	}))
	defer rows.Close()
	last := since
	for u, err := range rows.Iterator() {
		if err != nil {
			if last != since {
				return last, nil // what arrived counts; the next request resumes after it
			}
			return since, fmt.Errorf("/_db_updates since %s: %w", since, err)
		}
		if u.Seq != "" {
			last = u.Seq
		}
		s.log.Debug("database update", "db", u.DBName, "type", u.Type, "seq", u.Seq)
		if each != nil && s.Matches(u.DBName) {
			each(u.DBName)
		}
	}
	if seq, err := rows.LastSeq(); err == nil && seq != "" {
		last = seq
	}
	return last, nil
}

// followDBUpdates follows /_db_updates until ctx ends: each matching
// database it names is checked (created, updated or deleted alike: the
// check reads its update_seq, or finds it gone). After a failure it asks
// for a full catch-up once the feed answers again, since events may have
// been missed.
func (s *Supervisor) followDBUpdates(ctx context.Context, since string) {
	failures := 0
	for ctx.Err() == nil {
		next, err := s.pollDBUpdates(ctx, since, "longpoll", s.markDirty)
		if err == nil {
			if failures > 0 {
				select {
				case s.catchUp <- struct{}{}:
				default:
				}
			}
			since, failures = next, 0
			continue
		}
		if ctx.Err() != nil {
			return
		}
		failures++
		err = fmt.Errorf("database updates feed: %w", err)
		s.scanErr.Store(&err)
		d := backoff(failures, s.opts.Engine.FeedRetryMin, s.opts.Engine.FeedRetryMax)
		s.log.Warn("/_db_updates failed; reconnecting, then catching up with _all_dbs", "err", err, "in", d.Round(time.Millisecond))
		if !sleep(ctx, d) {
			return
		}
	}
}
