package supervisor

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

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

// Discovery modes, as Stats.Discovery and the start log name them.
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
		d := retry.Backoff(failures, s.opts.Engine.FeedRetryMin, s.opts.Engine.FeedRetryMax)
		s.log.Warn("server unreachable while asking for /_db_updates; asking again", "err", err, "in", d.Round(time.Millisecond))
		if !retry.Sleep(ctx, d) {
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
		d := retry.Backoff(failures, s.opts.Engine.FeedRetryMin, s.opts.Engine.FeedRetryMax)
		s.log.Warn("/_db_updates failed; reconnecting, then catching up with _all_dbs", "err", err, "in", d.Round(time.Millisecond))
		if !retry.Sleep(ctx, d) {
			return
		}
	}
}
