package workflow

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

// follow reads the changes feed from since until ctx ends. It never returns
// early: every error is logged, counted and followed by a reconnect with
// exponential backoff and jitter, so a server restart, a network cut or a
// deleted database only pauses it.
//
// Contact first, then wait: the first request, and the first after every
// failure, is a normal feed request, which the server answers at once with
// what it has. Once the feed has read to the head of the database it asks
// with feed=longpoll and a heartbeat, so that a server with nothing to say
// still sends a newline every FeedHeartbeat: that renews contact (the
// server is there), and a request on which nothing arrives for three
// heartbeats and 2s is on a dead connection or a hung server and is given
// up as a failure (PouchDB Server also stops the heartbeats of a longpoll
// whose database was deleted under it). The engine ends a longpoll itself after FeedTimeout: both CouchDB
// (with a heartbeat) and PouchDB Server (at the head of a database) would
// otherwise keep it open until a change; that end is no failure, counts no
// reconnect and is followed by the next request at once.
//
// It uses feed=longpoll in a loop rather than feed=continuous: each request
// ends, a dead connection is noticed by the missing heartbeats, and kivik
// v4.5.2 panics at the clean end of a continuous feed.
func (e *Engine) follow(ctx context.Context, since string) {
	failures := 0
	// longpoll is set once a normal request found the head of the feed,
	// cleared by every failure and reset.
	longpoll := false
	for ctx.Err() == nil {
		select {
		case <-e.resetFeed:
			since, longpoll = e.restartFeed(ctx), false
			continue
		default:
		}
		if e.tr.pending() >= e.opts.MaxPending {
			// The feed read as far as it may: the workers are behind,
			// not the feed.
			e.followed.Store(true)
			e.backpressured.Store(true)
		}
		err := e.tr.waitBelow(ctx, e.opts.MaxPending)
		e.backpressured.Store(false)
		if err != nil {
			return
		}
		ans, err := e.poll(ctx, since, longpoll)
		if err == nil {
			e.feedErr.Store(nil)
			since = ans.next
			failures = 0
			atHead := ans.rows < e.opts.FeedBatch
			e.caughtUp.Store(atHead)
			if atHead {
				e.followed.Store(true)
			}
			// A longpoll the engine ended without hearing anything (a
			// client that shows no heartbeats, or a heartbeat longer
			// than FeedTimeout on CouchDB, which sends nothing before
			// its first heartbeat) renewed no contact: the next request
			// is one the server answers at once.
			longpoll = atHead && (!ans.ended || ans.heard)
			if ans.ended || !atHead {
				continue
			}
			if !retry.Sleep(ctx, e.opts.FeedLinger) {
				return
			}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errFeedReset) {
			since, longpoll = e.restartFeed(ctx), false
			continue
		}
		longpoll = false
		failures++
		e.stats.feedErrors.Add(1)
		d := retry.Backoff(failures, e.opts.FeedRetryMin, e.opts.FeedRetryMax)
		if couch.IsNotFound(err) {
			err = fmt.Errorf("%w (%w)", missingDB(e.db), err)
		}
		e.feedErr.Store(&err)
		e.log.Warn("changes feed failed; reconnecting", "err", err, "since", since, "in", d.Round(time.Millisecond), "failures", failures)
		if couch.IsNotFound(err) {
			// The database is gone. When it comes back it is a new
			// database: the checkpoint verify below notices that.
			since = e.afterMissing(ctx, since)
		}
		// The pause is also the window in which PouchDB Server lets a
		// deleted database be created again: it refuses while a request
		// holds the database, and a request in the pause would hold it.
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

// feedAnswer is what one feed request brought.
type feedAnswer struct {
	// next is the seq to continue from; rows the changes received.
	next string
	rows int
	// ended: the engine ended the longpoll at FeedTimeout, the server
	// having had nothing to send (an answer, not a failure).
	ended bool
	// heartbeats: the client reports what the server sends (a client of
	// couch.NewClient), so heartbeats renewed contact during the request;
	// heard: it did send something during this request.
	heartbeats, heard bool
}

// stallLimit is how long a request may go without a byte from the server
// before it is given up as on a dead connection: three heartbeats and 2s
// for the server's own scheduling.
func (e *Engine) stallLimit() time.Duration { return 3*e.opts.FeedHeartbeat + 2*time.Second }

// feedDeadline bounds a request on a client that shows no heartbeats, whose
// dead connection only a deadline can notice.
func (e *Engine) feedDeadline() time.Duration {
	return e.opts.FeedTimeout + e.opts.FeedTimeout/2 + 5*time.Second
}

// poll makes one feed request and queues what it returns: a normal request
// (answered at once), or with longpoll a heartbeat longpoll that the engine
// ends after FeedTimeout.
func (e *Engine) poll(ctx context.Context, since string, longpoll bool) (feedAnswer, error) {
	reqCtx, cancel := context.WithTimeout(ctx, e.feedDeadline())
	defer cancel()
	act := couch.NewActivity(func() { e.feedContact.Store(time.Now().UnixNano()) })
	reqCtx = couch.WithActivity(reqCtx, act)
	// The watcher ends the request early: on a reset request (a longpoll
	// may wait FeedTimeout), and for a longpoll at FeedTimeout or when the
	// server sent nothing, not even a heartbeat, for stallLimit. A normal
	// request has no heartbeats (the server may be working out a large
	// batch in silence): only the deadline bounds it.
	stop := make(chan struct{})
	var reset, ended, stalled atomic.Bool
	var watcher sync.WaitGroup
	defer watcher.Wait()
	defer close(stop)
	watcher.Go(func() {
		var end, check <-chan time.Time
		if longpoll {
			t := time.NewTimer(e.opts.FeedTimeout)
			defer t.Stop()
			end = t.C
			tick := time.NewTicker(max(e.opts.FeedHeartbeat/2, 10*time.Millisecond))
			defer tick.Stop()
			check = tick.C
		}
		for {
			select {
			case <-e.resetFeed:
				reset.Store(true)
				cancel()
				return
			case <-end:
				ended.Store(true)
				cancel()
				return
			case <-check:
				if act.Wired() && act.Quiet() > e.stallLimit() {
					stalled.Store(true)
					cancel()
					return
				}
			case <-stop:
				return
			}
		}
	})

	params := map[string]any{
		"since": since,
		"limit": strconv.Itoa(e.opts.FeedBatch),
	}
	idsOnly := e.idsOnly()
	if !idsOnly && e.fedIDs {
		// Back to bodies (a member left): what was noted of own writes
		// must not cover a row whose body shows conflicts (process).
		e.ownRevs.reset()
	}
	e.fedIDs = idsOnly
	if idsOnly {
		// Rows alone, each with every leaf revision: a stored conflict
		// shows as more than one (see feedfetch.go).
		params["style"] = "all_docs"
	} else {
		params["include_docs"] = true
		// A stored conflict shows in the row's body, to be resolved.
		params["conflicts"] = true
	}
	if longpoll {
		params["feed"] = "longpoll"
		params["heartbeat"] = strconv.FormatInt(e.opts.FeedHeartbeat.Milliseconds(), 10)
		// With a heartbeat CouchDB ignores the timeout, and PouchDB Server
		// ignores it at the head of a database; a server that honours it
		// merely answers sooner.
		params["timeout"] = strconv.FormatInt(e.opts.FeedTimeout.Milliseconds(), 10)
	}
	// The client's transport replaces bodies over MaxDocBytes by a marker
	// while the response streams (see couch.WithBodyLimit).
	rows := e.db.Changes(couch.WithBodyLimit(reqCtx, int64(e.opts.MaxDocBytes)), kivik.Params(params))
	defer rows.Close()
	// Range over Iterator rather than calling rows.ScanDoc: ScanDoc reads
	// the iterator's state without its lock, which races with kivik
	// closing the iterator when the request context is cancelled (a reset,
	// the deadline, shutdown). Iterator hands out a copy of each row.
	ans := feedAnswer{next: since}
	var err error
	// The rows whose bodies are fetched once the answer is read; they are
	// queued before poll returns, whatever ended the request.
	var fetch []fetchRow
	for ch, iterErr := range rows.Iterator() {
		if iterErr != nil {
			err = iterErr
			break
		}
		ans.rows++
		e.stats.changes.Add(1)
		if ans.rows == 1 && seqRewound(since, ch.Seq) {
			// A cluster node was lost and its replacement's shard copy
			// is behind (apache/couchdb#3788): the feed replays changes
			// already seen. Workers re-read each document and decide from
			// its current state, so a replay does nothing twice; the
			// checkpoint follows the feed, as CouchDB asks.
			e.stats.seqRewinds.Add(1)
			e.log.Warn("changes feed went back; replaying", "since", since, "first", ch.Seq)
		}
		tok := e.tr.add(ch.Seq)
		ans.next = ch.Seq
		if ch.Deleted {
			e.tr.done([]token{tok})
			continue
		}
		if idsOnly {
			if tok, ok := e.sortRow(ch.ID, ch.Changes, tok); ok {
				fetch = append(fetch, fetchRow{id: ch.ID, tok: tok})
			}
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
		if size, ok := couch.TooLargeSize(doc); ok {
			// Refused here, before any worker holds it. Its change is
			// finished: this revision has nothing to do, and a newer
			// one comes with its own row.
			e.refuseOversized(ch.ID, revOf(ch.Changes), size)
			e.tr.done([]token{tok})
			continue
		}
		if len(doc) > e.opts.MaxDocBytes {
			// A client without the limiting transport sent it whole: it
			// is held already, but not kept.
			e.refuseOversized(ch.ID, revOf(ch.Changes), int64(len(doc)))
			e.tr.done([]token{tok})
			continue
		}
		if !e.budget.Load().TryHint(int64(len(doc))) {
			// The hints' share of the budget is used up: queue the id
			// alone, and the run reads the document within the budget.
			e.q.add(ch.ID, nil, 0, tok)
			continue
		}
		e.q.add(ch.ID, []byte(doc), tok.rev, tok)
	}
	e.fetchBodies(ctx, fetch)
	ans.heartbeats, ans.heard = act.Wired(), act.Heard()
	e.heartbeats.Store(ans.heartbeats)
	if reset.Load() {
		return ans, errFeedReset
	}
	if err != nil {
		switch {
		case ans.next != since:
			// Rows already queued keep their tokens; continuing from the
			// last one received loses nothing and repeats nothing.
			return ans, nil
		case ended.Load() && ctx.Err() == nil:
			// No contact is recorded here: without heartbeats an open
			// request proves nothing, and the next one, answered at
			// once, renews it.
			e.stats.feedRequests.Add(1)
			ans.ended = true
			return ans, nil
		case stalled.Load():
			return ans, fmt.Errorf("changes since %s: nothing from the server for %v (heartbeat %v): %w",
				since, e.stallLimit(), e.opts.FeedHeartbeat, errStalled)
		}
		return ans, fmt.Errorf("changes since %s: %w", since, err)
	}
	e.feedContact.Store(time.Now().UnixNano())
	e.stats.feedRequests.Add(1)
	if meta, err := rows.Metadata(); err == nil && meta.LastSeq != "" {
		e.tr.addDone(meta.LastSeq)
		ans.next = meta.LastSeq
	}
	return ans, nil
}

// errStalled means a feed request was given up because the server sent
// nothing, not even a heartbeat, for three heartbeats.
var errStalled = errors.New("feed request stalled")

// refuseOversized records a document over MaxDocBytes, which the engine
// does not handle. Nothing is written to it: CouchDB has no partial update,
// and recording the refusal on the document would mean reading it whole and
// writing it back whole, the very cost refused. The document stays as it is
// and is handled once an edit brings it under the limit.
func (e *Engine) refuseOversized(id, rev string, size int64) {
	e.stats.oversized.Add(1)
	if size > 0 {
		e.log.Warn("document too large; not handled", "id", id, "rev", rev, "bytes", size, "max_doc_bytes", e.opts.MaxDocBytes)
		return
	}
	// Cut at the limit: the server did not say its size.
	e.log.Warn("document too large; not handled", "id", id, "rev", rev, "max_doc_bytes", e.opts.MaxDocBytes)
}

func revOf(changes []string) string {
	if len(changes) == 0 {
		return ""
	}
	return changes[0]
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
