package workflow

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docstate/docstate/workflow/internal/budget"
	"github.com/docstate/docstate/workflow/internal/localdoc"
	"github.com/docstate/docstate/workflow/internal/retry"
	"github.com/docstate/docstate/workflow/internal/supervised"
	kivik "github.com/go-kivik/kivik/v4"
)

// Options tune an Engine. Zero values take the defaults named per field.
type Options struct {
	// Name identifies the engine's handler set on the database; the
	// checkpoint is stored in _local/docstate-<Name>. Default "docstate".
	Name string
	// Owner identifies this engine instance in claims. Default
	// hostname-pid-random, unique per start.
	Owner string
	// Workers is how many handlers run at once. Default 16. With group
	// commit on, up to BatchSize more documents may be between their
	// handler and their write at the same time.
	Workers int

	// BatchSize is the most document writes (results and claims) sent in
	// one _bulk_docs request: group commit. Each document keeps its own
	// compare-and-swap. 1 turns group commit off: every write is a single
	// PUT. Default 250.
	BatchSize int
	// BatchLinger is the longest a write waits for others to join its
	// batch (default 5ms). A batch goes at once when it is full or when
	// every run in progress is already waiting for it.
	BatchLinger time.Duration

	// HandlerTimeout, Lease, MaxAttempts, RetryBase and RetryMax are the
	// defaults for specs that leave them zero: 30s, 2m, 5, 1s, 1h.
	HandlerTimeout time.Duration
	Lease          time.Duration
	MaxAttempts    int
	RetryBase      time.Duration
	RetryMax       time.Duration

	// FeedTimeout is how long one longpoll request waits for a change
	// before the engine ends it and asks again (default 60s); FeedBatch the
	// changes asked for per request (default 500).
	FeedTimeout time.Duration
	FeedBatch   int
	// FeedHeartbeat is the heartbeat asked of the server on a longpoll: it
	// sends a newline that often while it has no change (default 5s, at
	// most half of FeedTimeout). The newlines renew the engine's contact
	// with the server; a longpoll on which nothing arrives for three
	// heartbeats and 2s is given up as a dead connection.
	FeedHeartbeat time.Duration
	// FeedRetryMin and FeedRetryMax bound the reconnect backoff after feed
	// errors (default 1s and 30s, with jitter). Only failures count: a
	// longpoll that waited FeedTimeout for nothing is not one, and a
	// success starts the backoff over.
	FeedRetryMin time.Duration
	FeedRetryMax time.Duration
	// FeedLinger is how long the feed waits before asking again after a
	// request that returned less than a full batch (default 20ms). Without
	// it, every write (the engine's own included) wakes the longpoll with a
	// single row, and the server answers a feed request per write.
	FeedLinger time.Duration
	// MaxPending bounds changes received but not finished; the feed pauses
	// at the bound. Default 10000.
	MaxPending int
	// MaxDocBytes is the largest document the engine handles, in bytes of
	// its JSON (default 1 MiB). A larger one is refused without being held
	// whole: the feed drops its body as it streams past, a read stops at
	// the limit, and nothing is written to it (CouchDB has no partial
	// update, so a note on the document would mean writing it back whole).
	// The refusal is counted (Stats.Oversized) and logged; the change is
	// finished, and the document is handled once an edit brings it under
	// the limit.
	MaxDocBytes int
	// MaxPendingBytes bounds the document bytes held at once: feed bodies
	// waiting in the queue (at most half of it; past that, or while runs
	// wait for budget, the feed queues the id alone and the run reads the
	// document) and the document each run holds (default 64 MiB, at least
	// twice MaxDocBytes). A run waits for budget before it reads. In a
	// supervisor all engines share one budget. Each body is counted once;
	// the engine's working copies of the documents in progress add about
	// twice as much again.
	MaxPendingBytes int

	// CheckpointInterval is how often the checkpoint is saved when it moved
	// (default 5s).
	CheckpointInterval time.Duration
	// ResyncInterval is how often the server is asked for documents whose
	// due time passed: expired claims, due retries, wake-ups (default 1m).
	ResyncInterval time.Duration
	// NoStartScan skips the scan at start that queues every document in a
	// registered (type, state); only the documents whose due time passed
	// are queued at start then. The scan makes a start level-triggered even
	// when the checkpoint is ahead of unfinished work (a handler added for
	// documents that were already there). In many-database mode it runs at
	// a database's first engine start of the process only.
	NoStartScan bool

	// Members makes several engines of the same Name on one database split
	// its documents instead of each handling all of them: each keeps a
	// membership document (docstate-member:<name>:<owner>) alive with a
	// lease of MemberLease (default 30s, renewed every third of it) and
	// handles the ids that rendezvous hashing gives it among the live
	// members; see members.go. Off, every engine handles every document
	// (failover, but duplicated effort).
	Members     bool
	MemberLease time.Duration

	// FeedWithoutBodies reads the changes feed as rows alone (id and leaf
	// revisions) and fetches, with one _bulk_get per feed answer, only the
	// bodies of the rows this engine will run: not another member's, not
	// its own writes that have nothing left to do (see feedfetch.go). An
	// engine does so anyway while it is one of several live members
	// (Members); this makes a single engine do it too. On PouchDB Server a
	// single engine measured no faster that way (the server reads every
	// body for its feed anyway, and the fetch is one more request per feed
	// answer); on CouchDB, where include_docs is a read per row, it may
	// pay. Default off: a single engine's feed brings the bodies.
	FeedWithoutBodies bool

	// PassStateless passes over documents of a handled type that have no
	// state field, recording nothing on them, instead of marking them
	// invalid. For databases that also hold other programs' documents of
	// the type, such as _users, where every entry is of type "user".
	PassStateless bool

	// DrainTimeout bounds how long Run waits for running handlers after its
	// context ends (default 30s). Past it their contexts are cancelled.
	DrainTimeout time.Duration

	// Logger receives the engine's logs. Default slog.Default().
	Logger *slog.Logger
	// OnRun, when set, is called after every handler run, for metrics. It
	// must be fast and must not block: it runs on the worker.
	OnRun func(RunInfo)
	// OnFlush, when set, is called after every group commit request, for
	// metrics. It must be fast and must not block.
	OnFlush func(FlushInfo)
}

// RunInfo describes one handler run. It holds no document id, so metrics
// built from it have bounded labels.
type RunInfo struct {
	Type, State string
	Mode        Mode
	// Result is "ok", "error" (retried), "terminal", "panic" or "timeout".
	Result   string
	Duration time.Duration
}

func (o *Options) setDefaults() error {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if o.Name == "" {
		o.Name = "docstate"
	}
	if err := checkName("engine name", o.Name); err != nil {
		return err
	}
	if o.Owner == "" {
		o.Owner = defaultOwner()
	}
	if o.Workers == 0 {
		o.Workers = 16
	}
	if o.BatchSize == 0 {
		o.BatchSize = 250
	}
	def(&o.BatchLinger, 5*time.Millisecond)
	def(&o.HandlerTimeout, 30*time.Second)
	def(&o.Lease, 2*time.Minute)
	if o.MaxAttempts == 0 {
		o.MaxAttempts = 5
	}
	def(&o.RetryBase, time.Second)
	def(&o.RetryMax, time.Hour)
	def(&o.FeedTimeout, time.Minute)
	if o.FeedBatch == 0 {
		o.FeedBatch = 500
	}
	def(&o.FeedLinger, 20*time.Millisecond)
	def(&o.FeedHeartbeat, min(5*time.Second, o.FeedTimeout/2))
	def(&o.FeedRetryMin, time.Second)
	def(&o.FeedRetryMax, 30*time.Second)
	if o.MaxPending == 0 {
		o.MaxPending = 10000
	}
	if o.MaxDocBytes == 0 {
		o.MaxDocBytes = 1 << 20
	}
	if o.MaxPendingBytes == 0 {
		o.MaxPendingBytes = max(64<<20, 2*o.MaxDocBytes)
	}
	def(&o.CheckpointInterval, 5*time.Second)
	def(&o.ResyncInterval, time.Minute)
	def(&o.DrainTimeout, 30*time.Second)
	def(&o.MemberLease, 30*time.Second)
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	switch {
	case o.FeedTimeout < 0, o.FeedHeartbeat <= 0:
		return fmt.Errorf("feed timeout %v and feed heartbeat %v must be positive", o.FeedTimeout, o.FeedHeartbeat)
	case o.Workers < 0, o.MaxAttempts < 0, o.FeedBatch < 0, o.MaxPending < 0, o.FeedLinger < 0, o.BatchSize < 0, o.BatchLinger < 0:
		return errors.New("workers, batch size, batch linger, max attempts, feed batch, feed linger and max pending must not be negative")
	case o.Lease <= o.HandlerTimeout:
		return fmt.Errorf("lease %v must exceed handler timeout %v", o.Lease, o.HandlerTimeout)
	case o.Members && o.MemberLease < 300*time.Millisecond:
		return fmt.Errorf("member lease %v is below 300ms", o.MemberLease)
	case o.RetryBase > o.RetryMax:
		return fmt.Errorf("retry base %v exceeds retry max %v", o.RetryBase, o.RetryMax)
	case o.MaxPending < o.FeedBatch:
		return fmt.Errorf("max pending %d is below feed batch %d", o.MaxPending, o.FeedBatch)
	case o.MaxDocBytes < 1024:
		return fmt.Errorf("max doc bytes %d is below 1024", o.MaxDocBytes)
	case o.MaxPendingBytes < 2*o.MaxDocBytes:
		// Hints take at most half; a read must fit in the other half.
		return fmt.Errorf("max pending bytes %d is below twice max doc bytes %d", o.MaxPendingBytes, o.MaxDocBytes)
	}
	return nil
}

func defaultOwner() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "unknown"
	}
	var b [4]byte
	_, _ = crand.Read(b[:])
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

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
	// ownRevs holds the revisions this engine wrote until their feed rows
	// come (see feedfetch.go); fedIDs is set while the feed reads rows
	// without bodies (only the feed goroutine uses it).
	ownRevs *ownRevs
	fedIDs  bool
	// members is the live membership when Options.Members is set, else nil.
	members *members
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

// Stats is a snapshot of the engine's counters.
type Stats struct {
	ChangesReceived  int64 // feed rows received
	Runs             int64 // handler runs
	RunErrors        int64 // handler runs that returned an error (panics included)
	Panics           int64 // handler panics recovered
	Transitions      int64 // results written
	Noops            int64 // results that changed nothing and were not written
	Conflicts        int64 // writes rejected with 409 (the document moved on)
	ClaimsWon        int64 // unsafe claims written
	ClaimsLost       int64 // unsafe claim writes that lost the race
	ClaimsHeld       int64 // documents skipped because another owner holds a live claim
	ClaimsTakenOver  int64 // expired claims taken over (RetryExpired)
	ClaimsRenewed    int64 // leases renewed while their claim waited for a handler slot
	ClaimsReleased   int64 // claims given back unrun because the engine stopped
	ClaimsWaiting    int64 // claims written and waiting for a handler slot now
	Members          int64 // live members seen on the database now, this one included (0: membership off)
	Rebalances       int64 // changes of the live member set, each followed by a rescan
	SkippedOther     int64 // queued ids passed over unread as another member's
	ClaimsExpired    int64 // expired claims sent to the error state (FailExpired)
	ResultsDropped   int64 // unsafe results not written because the claim was lost meanwhile
	ClaimsUnproven   int64 // claim writes not answered 201 (202 Accepted on a cluster), proved before running
	ClaimsProven     int64 // of them, proved and run
	ClaimsYielded    int64 // of them, given up without running (a rival branch, or no quorum)
	BranchesRemoved  int64 // losing branches of conflicted documents removed
	ConflictsWaiting int64 // conflicted documents left for later because a branch held a live claim
	SeqRewinds       int64 // feed answers whose sequence went back (a cluster node lost); replayed
	RetriesScheduled int64 // failed runs recorded with a backoff
	Failed           int64 // documents moved to an error state
	Invalid          int64 // documents of a handled type recorded as invalid
	Skipped          int64 // feed documents that are not workflow documents
	Transient        int64 // runs repeated because the server could not be reached
	FeedRequests     int64 // feed requests answered, longpolls ended after FeedTimeout with nothing to report included
	FeedErrors       int64 // feed requests failed, a longpoll without heartbeats included (each followed by a reconnect with backoff)
	FeedResets       int64 // feed restarted from 0 because the database was re-created
	BodyFetches      int64 // requests for the bodies of feed rows (POST _all_docs), with a feed without bodies
	BodiesFetched    int64 // document bodies they brought
	OwnRows          int64 // feed rows of this engine's own writes finished unread (no handler, or superseded by its later write)
	CheckpointsSaved int64
	ResyncQueued     int64 // ids queued by scans
	Batches          int64 // group commit requests (_bulk_docs) sent
	BatchedWrites    int64 // document writes sent in them
	Inflight         int64 // handler runs in progress now
	Queued           int64 // ids waiting for a worker now
	Delayed          int64 // ids waiting for a timer (retries, wake-ups, claim expiries) now
	Pending          int64 // changes received and not yet checkpointed now
	Oversized        int64 // documents refused as larger than MaxDocBytes, neither held whole nor written
	PendingBytes     int64 // document bytes held now: queued feed bodies and the documents runs hold
	PendingBytesPeak int64 // the most PendingBytes ever was

	CheckpointSaved time.Time // when the checkpoint was last written (zero: not yet)
	FeedContact     time.Time // when the server last sent something on the feed, a heartbeat included (zero: not yet)
}

type counters struct {
	changes, runs, runErrors, panics, transitions, noops, conflicts           atomic.Int64
	claimsWon, claimsLost, claimsHeld, claimsTakenOver, claimsExpired         atomic.Int64
	resultsDropped, retries, failed, invalid, skipped, transient              atomic.Int64
	feedRequests, feedErrors, feedResets, checkpoints, resyncQueued, inflight atomic.Int64
	batches, batchedWrites, oversized                                         atomic.Int64
	claimsRenewed, claimsReleased, claimsWaiting                              atomic.Int64
	claimsUnproven, claimsProven, claimsYielded                               atomic.Int64
	fetches, fetched, ownRows                                                 atomic.Int64
	conflictsResolved, conflictsWaiting, seqRewinds                           atomic.Int64
}

// Stats returns the counters now.
func (e *Engine) Stats() Stats {
	c := &e.stats
	s := Stats{
		ChangesReceived: c.changes.Load(), Runs: c.runs.Load(), RunErrors: c.runErrors.Load(),
		Panics: c.panics.Load(), Transitions: c.transitions.Load(), Noops: c.noops.Load(),
		Conflicts: c.conflicts.Load(), ClaimsWon: c.claimsWon.Load(), ClaimsLost: c.claimsLost.Load(),
		ClaimsHeld: c.claimsHeld.Load(), ClaimsTakenOver: c.claimsTakenOver.Load(),
		ClaimsExpired: c.claimsExpired.Load(), ResultsDropped: c.resultsDropped.Load(),
		RetriesScheduled: c.retries.Load(), Failed: c.failed.Load(), Invalid: c.invalid.Load(),
		Skipped: c.skipped.Load(), Transient: c.transient.Load(), FeedRequests: c.feedRequests.Load(),
		FeedErrors: c.feedErrors.Load(), FeedResets: c.feedResets.Load(),
		CheckpointsSaved: c.checkpoints.Load(), ResyncQueued: c.resyncQueued.Load(),
		Batches: c.batches.Load(), BatchedWrites: c.batchedWrites.Load(), Oversized: c.oversized.Load(),
		ClaimsRenewed: c.claimsRenewed.Load(), ClaimsReleased: c.claimsReleased.Load(),
		ClaimsWaiting:  c.claimsWaiting.Load(),
		ClaimsUnproven: c.claimsUnproven.Load(), ClaimsProven: c.claimsProven.Load(), ClaimsYielded: c.claimsYielded.Load(),
		BodyFetches: c.fetches.Load(), BodiesFetched: c.fetched.Load(), OwnRows: c.ownRows.Load(),
		BranchesRemoved: c.conflictsResolved.Load(), ConflictsWaiting: c.conflictsWaiting.Load(), SeqRewinds: c.seqRewinds.Load(),
		Inflight: c.inflight.Load(), Queued: int64(e.q.len()),
	}
	if m := e.members; m != nil {
		s.Members, s.Rebalances, s.SkippedOther = int64(m.seen()), m.rebalances.Load(), m.skipped.Load()
	}
	s.Pending = int64(e.tr.pending())
	s.PendingBytes, s.PendingBytesPeak = e.budget.Load().Stats()
	s.Delayed = int64(e.q.delayedLen())
	if t := e.checkpointSaved.Load(); t != 0 {
		s.CheckpointSaved = time.Unix(0, t)
	}
	if t := e.feedContact.Load(); t != 0 {
		s.FeedContact = time.Unix(0, t)
	}
	return s
}

// onFlush counts a group commit and passes it to the OnFlush hook.
func (e *Engine) onFlush(info FlushInfo) {
	e.stats.batches.Add(1)
	e.stats.batchedWrites.Add(int64(info.Docs))
	if info.Err != nil {
		e.log.Debug("group commit failed", "docs", info.Docs, "err", info.Err)
	}
	if e.opts.OnFlush != nil {
		e.opts.OnFlush(info)
	}
}
