package workflow

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// follow reads the changes feed from since until ctx ends. It never returns
// early: every error is logged, counted and followed by a reconnect with
// exponential backoff and jitter, so a server restart, a network cut or a
// deleted database only pauses it.
//
// It uses feed=longpoll in a loop rather than feed=continuous: each request
// ends by itself, a dead connection is noticed by the request deadline, and
// kivik v4.5.2 panics at the clean end of a continuous feed.
func (e *Engine) follow(ctx context.Context, since string) {
	failures := 0
	for ctx.Err() == nil {
		select {
		case <-e.resetFeed:
			since = e.restartFeed(ctx)
			continue
		default:
		}
		e.backpressured.Store(e.tr.pending() >= e.opts.MaxPending)
		err := e.tr.waitBelow(ctx, e.opts.MaxPending)
		e.backpressured.Store(false)
		if err != nil {
			return
		}
		next, rows, err := e.poll(ctx, since)
		if err == nil {
			e.feedContact.Store(time.Now().UnixNano())
			e.feedErr.Store(nil)
			since = next
			failures = 0
			e.caughtUp.Store(rows < e.opts.FeedBatch)
			if rows < e.opts.FeedBatch && !sleep(ctx, e.opts.FeedLinger) {
				return
			}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errFeedReset) {
			since = e.restartFeed(ctx)
			continue
		}
		failures++
		e.stats.feedErrors.Add(1)
		d := backoff(failures, e.opts.FeedRetryMin, e.opts.FeedRetryMax)
		if errors.Is(err, context.DeadlineExceeded) {
			// The longpoll outlived the server's own timeout by its
			// slack: PouchDB Server sometimes ignores the timeout at the
			// head of a quiet database, and always on a database deleted
			// under the request. Neither is a failure of the feed (an
			// engine with nothing to do must stay idle, so that a
			// supervisor can stop it), so it is not recorded as one; the
			// request is made again after the same pause as after a
			// failure, which is also the window in which PouchDB Server
			// lets a deleted database be created again (it refuses while
			// a request holds it, and a database request in the pause
			// would hold it too). Contact is not renewed, so a server
			// that never answers still fails readiness after
			// feed_timeout + 35s of silence.
			e.log.Debug("changes feed request outlived its timeout; asking again", "since", since, "in", d.Round(time.Millisecond))
		} else {
			e.feedErr.Store(&err)
			e.log.Warn("changes feed failed; reconnecting", "err", err, "since", since, "in", d.Round(time.Millisecond), "failures", failures)
		}
		if couch.IsNotFound(err) {
			// The database is gone. When it comes back it is a new
			// database: the checkpoint verify below notices that.
			since = e.afterMissing(ctx, since)
		}
		select {
		case <-ctx.Done():
			return
		case <-e.resetFeed:
			since = e.restartFeed(ctx)
		case <-time.After(d):
		}
	}
}

var errFeedReset = errors.New("feed reset requested")

// feedDeadline bounds one longpoll request: the server's own timeout plus
// slack. A request that outlives it is on a dead connection, or (PouchDB
// Server) on a database deleted under it, whose feed never answers.
func (e *Engine) feedDeadline() time.Duration {
	return e.opts.FeedTimeout + e.opts.FeedTimeout/2 + 5*time.Second
}

// poll makes one longpoll request and queues what it returns. It returns
// the seq to continue from and the number of rows.
func (e *Engine) poll(ctx context.Context, since string) (string, int, error) {
	reqCtx, cancel := context.WithTimeout(ctx, e.feedDeadline())
	defer cancel()
	// A reset request must interrupt a longpoll that may wait a minute.
	stop := make(chan struct{})
	reset := make(chan struct{}, 1)
	var watcher sync.WaitGroup
	defer watcher.Wait()
	defer close(stop)
	watcher.Go(func() {
		select {
		case <-e.resetFeed:
			reset <- struct{}{}
			cancel()
		case <-stop:
		}
	})

	rows := e.db.Changes(reqCtx, kivik.Params(map[string]any{
		"feed":         "longpoll",
		"since":        since,
		"timeout":      strconv.FormatInt(e.opts.FeedTimeout.Milliseconds(), 10),
		"limit":        strconv.Itoa(e.opts.FeedBatch),
		"include_docs": true,
		// A stored conflict shows in the row's body, to be resolved.
		"conflicts": true,
	}))
	defer rows.Close()
	// Range over Iterator rather than calling rows.ScanDoc: ScanDoc reads
	// the iterator's state without its lock, which races with kivik
	// closing the iterator when the request context is cancelled (a reset,
	// the deadline, shutdown). Iterator hands out a copy of each row.
	last, n := since, 0
	var err error
	for ch, iterErr := range rows.Iterator() {
		if iterErr != nil {
			err = iterErr
			break
		}
		n++
		e.stats.changes.Add(1)
		if n == 1 && seqRewound(since, ch.Seq) {
			// A cluster node was lost and its replacement's shard copy
			// is behind (apache/couchdb#3788): the feed replays changes
			// already seen. Workers re-read each document and decide from
			// its current state, so a replay does nothing twice; the
			// checkpoint follows the feed, as CouchDB asks.
			e.stats.seqRewinds.Add(1)
			e.log.Warn("changes feed went back; replaying", "since", since, "first", ch.Seq)
		}
		tok := e.tr.add(ch.Seq)
		last = ch.Seq
		if ch.Deleted {
			e.tr.done([]token{tok})
			continue
		}
		if len(ch.Changes) > 0 {
			tok.rev = revGeneration(ch.Changes[0])
		}
		var doc jsonDoc
		if scanErr := ch.ScanDoc(&doc); scanErr != nil || len(doc) == 0 {
			// No body: the worker reads the document itself.
			e.q.add(ch.ID, nil, 0, tok)
			continue
		}
		e.q.add(ch.ID, []byte(doc), tok.rev, tok)
	}
	select {
	case <-reset:
		return last, n, errFeedReset
	default:
	}
	if err != nil {
		// Rows already queued keep their tokens; continuing from the last
		// one received loses nothing and repeats nothing.
		if last != since {
			return last, n, nil
		}
		return since, n, fmt.Errorf("changes since %s: %w", since, err)
	}
	e.stats.feedRequests.Add(1)
	if meta, err := rows.Metadata(); err == nil && meta.LastSeq != "" {
		e.tr.addDone(meta.LastSeq)
		last = meta.LastSeq
	}
	return last, n, nil
}

// seqRewound reports whether seq, the first row after since, lies before
// it. CouchDB 3 sequences are opaque strings ("123-g1AAAA…") whose numeric
// prefix is a sum over shards, which grows except when a shard copy is
// lost; PouchDB Server's are plain numbers. Anything else is never called
// a rewind.
func seqRewound(since, seq string) bool {
	a, okA := seqNumber(since)
	b, okB := seqNumber(seq)
	return okA && okB && b < a
}

func seqNumber(seq string) (int64, bool) {
	n, _, _ := strings.Cut(seq, "-")
	v, err := strconv.ParseInt(n, 10, 64)
	return v, err == nil
}

// jsonDoc keeps the document bytes from the feed as they came.
type jsonDoc []byte

func (d *jsonDoc) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	*d = append((*d)[:0], b...)
	return nil
}

// afterMissing waits out a missing database: once it exists again, an
// unchanged checkpoint means it was only unreachable; anything else means
// it was re-created.
func (e *Engine) afterMissing(ctx context.Context, since string) string {
	err := e.cp.verify(ctx)
	if errors.Is(err, errRecreated) {
		if _, infoErr := e.db.Stats(ctx); infoErr == nil {
			return e.restartFeed(ctx)
		}
	}
	return since
}

// restartFeed starts over from 0 in a re-created database. Changes in
// flight from the old database become void; the level-triggered workers
// re-read whatever they were doing anyway.
func (e *Engine) restartFeed(ctx context.Context) string {
	e.stats.feedResets.Add(1)
	_ = e.retry(ctx, "cannot write checkpoint in re-created database", func() error { return e.cp.restart(ctx) })
	e.tr.reset("0")
	e.log.Warn("feed restarted from 0 in a re-created database")
	return "0"
}
