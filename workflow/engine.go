package workflow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docstate/docstate/workflow/internal/budget"
	"github.com/docstate/docstate/workflow/internal/localdoc"
	"github.com/docstate/docstate/workflow/internal/retry"
	"github.com/docstate/docstate/workflow/internal/supervised"
	kivik "github.com/go-kivik/kivik/v4"
)

// Engine follows one database's changes and runs the registered handlers.
type Engine struct {
	db    *kivik.DB
	reg   *Registry
	specs map[key]Spec
	types map[string]bool
	opts  Options
	log   *slog.Logger

	q     *queue
	tr    *tracker
	cp    *checkpointer
	stats counters
	// batch is the group commit, nil when BatchSize is 1.
	batch *batcher
	// own holds the revisions this engine wrote; set from a supervisor's
	// hooks (see Run), nil otherwise, so a single engine's writes pay
	// nothing.
	own *supervised.OwnWrites
	// handlerSlots bounds handlers running at once to Workers, while more
	// workers than that wait for their writes.
	handlerSlots chan struct{}
	// ahead bounds unsafe claims written ahead of their handler slot;
	// parked counts runs waiting in it or for a slot, which will not write
	// soon, so a group commit need not wait for them.
	ahead  *aheadGate
	parked atomic.Int64
	// rechecks holds the ids whose handler asked for an in-memory recheck
	// (Result.RecheckAfter): their next run is not skipped as settled.
	rechecks sync.Map
	// hidden holds the ids of documents this engine knows to have had
	// another branch (it yielded to one, or waited for a branch's live
	// claim): on a cluster a GET shows one replica's view and may not
	// show the branch, so their next run reads every leaf (conflicts.go).
	hidden sync.Map
	// ownRevs holds the revisions this engine wrote until their feed rows
	// come (see feedfetch.go); fedIDs is set while the feed reads rows
	// without bodies (only the feed goroutine uses it).
	ownRevs *ownRevs
	fedIDs  bool
	// members is the live membership when Options.Members is set, else nil.
	members *members
	// dueIndex is what the due scan knows of its index (resync.go), nil
	// until the first due scan.
	dueIndex atomic.Pointer[dueIndexState]
	// copies is how many copies of each document the database keeps
	// (couch.Replicas), 0 until an unsafe claim asks (prove.go).
	copies atomic.Int32
	// stopping is closed when the engine starts to drain: claims waiting
	// for a slot are released rather than run.
	stopping <-chan struct{}
	// budget bounds the document bytes held (MaxPendingBytes); a
	// supervisor's engines share one. Atomic because Run puts the shared
	// one in place while the supervisor may already read Stats.
	budget atomic.Pointer[budget.Budget]

	resetFeed chan struct{}
	running   atomic.Bool
	// feedContact is when the server last sent anything on the feed: an
	// answer, a row, a heartbeat (unix nanoseconds), for readiness.
	feedContact atomic.Int64
	// heartbeats is set when the client shows what the server sends
	// (couch.NewClient's): heartbeats then renew feedContact.
	heartbeats atomic.Bool
	// followed is set once the feed read to the head of the database, or
	// as far as MaxPending lets it: the engine has caught up with the feed.
	followed atomic.Bool
	// checkpointSaved is when the checkpoint was last written (unix ns).
	checkpointSaved atomic.Int64
	// feedErr is the last feed request's error, nil after a success.
	feedErr atomic.Pointer[error]
	// backpressured is set while the feed waits for workers to catch up
	// (max_pending); progress is when a run last finished (unix ns).
	backpressured atomic.Bool
	progress      atomic.Int64
	// startScanned is set once the start scan queued its documents;
	// caughtUp while the last feed request returned less than a batch.
	startScanned, caughtUp atomic.Bool
}

// New returns an engine for db running reg's handlers. Spec fields left zero
// are filled from opts.
func New(db *kivik.DB, reg *Registry, opts Options) (*Engine, error) {
	if db == nil || reg == nil {
		return nil, errors.New("workflow: db and registry are required")
	}
	if err := opts.setDefaults(); err != nil {
		return nil, fmt.Errorf("workflow options: %w", err)
	}
	e := &Engine{
		db:        db,
		reg:       reg,
		specs:     make(map[key]Spec, reg.Len()),
		types:     make(map[string]bool),
		opts:      opts,
		log:       opts.Logger.With("db", db.Name(), "engine", opts.Name),
		q:         newQueue(),
		tr:        newTracker(""),
		resetFeed: make(chan struct{}, 1),

		handlerSlots: make(chan struct{}, opts.Workers),
		ahead:        newAheadGate(opts.Workers, opts.BatchSize),
		ownRevs:      newOwnRevs(max(2*opts.MaxPending, supervised.MaxOwnWrites)),
	}
	e.setBudget(budget.New(int64(opts.MaxPendingBytes)))
	if opts.BatchSize > 1 {
		busy := func() int64 { return e.stats.inflight.Load() - e.parked.Load() }
		e.batch = newBatcher(db, opts.BatchSize, opts.BatchLinger, busy, e.onFlush)
	}
	for _, s := range reg.Specs() {
		if s.Timeout == 0 {
			s.Timeout = opts.HandlerTimeout
		}
		if s.Lease == 0 {
			s.Lease = opts.Lease
		}
		if s.Lease <= s.Timeout {
			return nil, fmt.Errorf("workflow: %s/%s: lease %v must exceed timeout %v", s.Type, s.State, s.Lease, s.Timeout)
		}
		if s.MaxAttempts == 0 {
			s.MaxAttempts = opts.MaxAttempts
		}
		if s.ErrorState == "" {
			s.ErrorState = DefaultErrorState
		}
		if s.Backoff == nil {
			base, max := opts.RetryBase, opts.RetryMax
			s.Backoff = func(attempt int) time.Duration { return retry.Backoff(attempt, base, max) }
		}
		e.specs[key{s.Type, s.State}] = s
		e.types[s.Type] = true
	}
	e.cp = &checkpointer{db: db, id: localdoc.CheckpointID(opts.Name), owner: opts.Owner}
	if opts.Members {
		e.members = newMembers(db, opts.Name, opts.Owner, opts.MemberLease, e.log)
	}
	return e, nil
}

// setBudget makes the engine count its documents' bytes in b. It is called
// before Run.
func (e *Engine) setBudget(b *budget.Budget) {
	e.budget.Store(b)
	e.q.budget = b
}

// Idle reports whether the engine has nothing to do now: its start scan
// is done, its feed is caught up and healthy, and no document is queued,
// running or unfinished. Documents waiting for a timer do not count (see
// NextDue).
func (e *Engine) Idle() bool {
	return e.startScanned.Load() && e.caughtUp.Load() && e.feedErr.Load() == nil && e.feedContact.Load() != 0 &&
		e.q.len() == 0 && e.stats.inflight.Load() == 0 && e.tr.pending() == 0
}

// NextDue returns the earliest time a document waits for (a retry, a
// wake-up, a claim's expiry), zero when none does. A supervisor that stops
// an idle engine starts it again then. In-memory rechecks
// (Result.RecheckAfter) are left out: they live in this engine's memory
// only, so an engine started again for one would not have it, and
// restarting engines for them would keep the slots of a many-database
// daemon busy with nothing to do. A stopped engine's rechecks lapse; the
// next change of the document runs its handler again.
func (e *Engine) NextDue() time.Time {
	return e.q.nextDue(func(id string) bool {
		_, recheck := e.rechecks.Load(id)
		return recheck
	})
}

// Options returns the options the engine runs with, defaults filled in.
func (e *Engine) Options() Options { return e.opts }

// hasType reports whether a type has handlers.
func (e *Engine) hasType(t string) bool { return e.types[t] }

// Owner returns the id this engine writes into claims.
func (e *Engine) Owner() string { return e.opts.Owner }

// Run follows the database until ctx ends, then drains: running handlers get
// up to DrainTimeout to finish, queued documents are left for the next start
// (their changes are not checkpointed), and the checkpoint is saved. Run
// returns nil after a drain caused by ctx, or the error that stopped it.
func (e *Engine) Run(ctx context.Context) error {
	if !e.running.CompareAndSwap(false, true) {
		return errors.New("workflow: engine is already running")
	}
	if h := supervised.From(ctx); h != nil {
		// Before any goroutine of this run: they see the shared budget
		// and the write record.
		if h.Budget != nil {
			e.setBudget(h.Budget)
		}
		e.own = h.Own
		defer func() { h.StartScanned, h.SavedSeq = e.startScanned.Load(), e.cp.savedSeq() }()
	}
	since, err := e.loadCheckpoint(ctx)
	if err != nil {
		if ctx.Err() != nil {
			// Stopped while waiting for the server or the database:
			// a stop, nothing to drain.
			return nil
		}
		return err
	}
	e.tr.reset(since)
	e.log.Info("engine starting", "since", since, "owner", e.opts.Owner, "workers", e.opts.Workers, "handlers", len(e.specs))

	// Handlers and their writes run under work, which outlives ctx by at
	// most DrainTimeout, so a stop lets them finish instead of cutting
	// side effects in half.
	work, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	e.stopping = ctx.Done()

	var background, workers, writer sync.WaitGroup
	background.Go(func() { e.q.runTimers(ctx) })
	background.Go(func() { e.follow(ctx, since) })
	background.Go(func() { e.saveCheckpoints(ctx) })
	background.Go(func() { e.resyncLoop(ctx) })
	if e.members != nil {
		background.Go(func() { e.members.run(ctx) })
	}
	workerCount := e.opts.Workers
	writersGone := make(chan struct{})
	if e.batch != nil {
		// Enough workers to fill a batch while every handler slot is
		// busy: the handlers, not the write round trips, are the limit.
		workerCount += e.opts.BatchSize
		writer.Go(func() { e.batch.run(work, writersGone) })
	}
	for range workerCount {
		workers.Go(func() {
			for {
				w, ok := e.q.get()
				if !ok {
					return
				}
				e.process(work, w)
			}
		})
	}

	<-ctx.Done()
	e.log.Info("engine draining", "running", e.stats.inflight.Load(), "queued", e.q.len(), "timeout", e.opts.DrainTimeout)
	e.q.close()
	drained := make(chan struct{})
	go func() { workers.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(e.opts.DrainTimeout):
		e.log.Warn("drain timeout: cancelling running handlers", "running", e.stats.inflight.Load())
		stopWork()
		<-drained
	}
	close(writersGone)
	writer.Wait()
	background.Wait()
	e.q.dropHints()

	saveCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := e.cp.save(saveCtx, e.tr.checkpoint()); err != nil {
		e.log.Warn("final checkpoint not saved; changes since the last one will be replayed", "err", err)
	}
	e.log.Info("engine stopped", "checkpoint", e.tr.checkpoint())
	return nil
}

// loadCheckpoint reads the checkpoint, retrying while the server is away.
func (e *Engine) loadCheckpoint(ctx context.Context) (string, error) {
	var since string
	err := e.retry(ctx, "cannot load checkpoint", func() (err error) {
		since, err = e.cp.load(ctx)
		if err != nil {
			// Readiness tells why the feed has not started: a database
			// that does not exist, a server away.
			e.feedErr.Store(&err)
		}
		return err
	})
	if err != nil {
		return "", fmt.Errorf("workflow: load checkpoint: %w", err)
	}
	return since, nil
}

// retry calls fn until it succeeds or ctx ends, waiting between failures
// with the feed's reconnect backoff. what starts the warning logged for each
// failure. It returns ctx's error if ctx ended first.
func (e *Engine) retry(ctx context.Context, what string, fn func() error) error {
	for attempt := 1; ; attempt++ {
		err := fn()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := retry.Backoff(attempt, e.opts.FeedRetryMin, e.opts.FeedRetryMax)
		e.log.Warn(what+"; retrying", "err", err, "in", d)
		if !retry.Sleep(ctx, d) {
			return ctx.Err()
		}
	}
}

// Ready reports whether the engine is in contact with the server and caught
// up with its feed: nil when the last feed request succeeded, the feed has
// read to the head of the database (or as far as MaxPending lets it), and
// the server sent something on the feed within the contact limit (three
// heartbeats + 2s + one heartbeat, 22s by default; without a client that
// shows heartbeats FeedTimeout more), otherwise the reason. The first
// request is answered at once, so an idle engine on a quiet database is
// ready a round trip after its start, and ready again a round trip after
// the server is back from an outage. A daemon's readiness probe and
// watchdog use it.
func (e *Engine) Ready() error {
	if err := e.feedErr.Load(); err != nil {
		return fmt.Errorf("the changes feed is failing: %w", *err)
	}
	last := e.feedContact.Load()
	if last == 0 {
		return errors.New("the server has not answered the changes feed yet")
	}
	if !e.followed.Load() {
		return errors.New("the changes feed is still reading up to the head of the database")
	}
	age := time.Since(time.Unix(0, last))
	limit := e.contactLimit()
	if age <= limit {
		return nil
	}
	// A feed paused on purpose until the workers catch up is healthy as
	// long as they are finishing work: a busy daemon is not a stuck one.
	if e.backpressured.Load() {
		if idle := time.Since(time.Unix(0, e.progress.Load())); idle <= limit {
			return nil
		}
		return fmt.Errorf("the feed waits for workers at max pending, and no run finished for %v", time.Since(time.Unix(0, e.progress.Load())).Round(time.Second))
	}
	return fmt.Errorf("nothing from the server on the changes feed for %v (limit %v)", age.Round(time.Second), limit)
}

// contactLimit is the longest silence on the feed of an engine in contact.
// With heartbeats the server sends something every FeedHeartbeat, and a
// silent longpoll is given up after stallLimit; without, contact is renewed
// by the request that follows each longpoll, every FeedTimeout.
func (e *Engine) contactLimit() time.Duration {
	if e.heartbeats.Load() {
		return e.stallLimit() + e.opts.FeedHeartbeat
	}
	return e.opts.FeedTimeout + e.stallLimit()
}
