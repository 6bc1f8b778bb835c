package workflow

import (
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"
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
