package workflow

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// FlushInfo describes one group commit, for metrics. It holds no document
// id, so metrics built from it have bounded labels.
type FlushInfo struct {
	// Docs is how many document writes the request carried.
	Docs int
	// Conflicts is how many of them the server refused with 409.
	Conflicts int
	// Duration is the _bulk_docs round trip (fallback PUTs included).
	Duration time.Duration
	// Err is the request's error when the whole request failed.
	Err error
}

// batcher is the group commit: it gathers the compare-and-swap writes of
// many workers into one _bulk_docs request. Each document still carries its
// _rev and the server answers for each one, accepted or 409, so every writer
// gets exactly the answer a single PUT would have given it: the engine's
// MVCC rules do not change, only the number of round trips.
//
// A batch is sent when it is full, when every run in progress is already
// waiting for a write (nobody else is about to join it), or when the oldest
// write in it has waited linger. While flights requests are under way, new
// writes keep joining the next batch, so batches grow with the load.
type batcher struct {
	db      *kivik.DB
	size    int
	linger  time.Duration
	flights int
	// busy reports how many runs are in progress; a batch holding a write
	// from each of them, beside those already sent, has nothing to wait for.
	busy    func() int64
	onFlush func(FlushInfo)

	reqs chan *writeReq
	// sent counts writes in requests under way.
	sent atomic.Int64
}

type writeReq struct {
	id   string
	body any
	done chan writeResp
}

type writeResp struct {
	rev string
	err error
	// status is the HTTP status of the request that carried the write.
	status int
}

func newBatcher(db *kivik.DB, size int, linger time.Duration, busy func() int64, onFlush func(FlushInfo)) *batcher {
	return &batcher{
		db: db, size: size, linger: linger, flights: 2, busy: busy, onFlush: onFlush,
		reqs: make(chan *writeReq, size),
	}
}

// put writes body as document id through the next batch and returns its new
// revision, or the error a single PUT would have returned. It waits for the
// batch's answer even when ctx ends meanwhile, unless the request was not
// sent yet: a write that may have reached the server must not be reported
// as not made.
func (b *batcher) put(ctx context.Context, id string, body any) (string, error) {
	r := &writeReq{id: id, body: body, done: make(chan writeResp, 1)}
	select {
	case b.reqs <- r:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	resp := <-r.done
	couch.StatusFrom(ctx).Observe(resp.status)
	return resp.rev, resp.err
}

// run collects and sends batches until ctx ends and every write handed to
// it is answered. Its caller stops it only after all writers are gone.
func (b *batcher) run(ctx context.Context, stop <-chan struct{}) {
	var flights sync.WaitGroup
	defer flights.Wait()
	slots := make(chan struct{}, b.flights)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()

	var batch []*writeReq
	lingered := false
	send := func() {
		out := batch
		batch, lingered = nil, false
		timer.Stop()
		b.sent.Add(int64(len(out)))
		flights.Go(func() {
			defer func() { <-slots }()
			b.flush(ctx, out)
			b.sent.Add(-int64(len(out)))
		})
	}
	for {
		in, slot := b.reqs, chan struct{}(nil)
		if len(batch) >= b.size {
			in = nil
		}
		if len(batch) > 0 && (len(batch) >= b.size || lingered || int64(len(batch))+b.sent.Load() >= b.busy()) {
			slot = slots
		}
		select {
		case r := <-in:
			batch = append(batch, r)
			if len(batch) == 1 {
				timer.Reset(b.linger)
			}
		case <-timer.C:
			lingered = true
		case slot <- struct{}{}:
			send()
		case <-stop:
			// Every writer is gone, so every write handed over was
			// answered; a batch still open here would be a bug, and is
			// sent rather than dropped.
		drain:
			for {
				select {
				case r := <-b.reqs:
					batch = append(batch, r)
				default:
					break drain
				}
			}
			if len(batch) > 0 {
				slots <- struct{}{}
				send()
			}
			return
		}
	}
}

// flush sends one batch and answers each of its writers.
func (b *batcher) flush(ctx context.Context, batch []*writeReq) {
	began := time.Now()
	docs := make([]any, len(batch))
	for i, r := range batch {
		docs[i] = r.body
	}
	info := FlushInfo{Docs: len(batch)}
	// A 202 answers the whole request: rows carry no status of their own.
	sctx, st := couch.RecordStatus(ctx)
	results, err := b.db.BulkDocs(sctx, docs)
	status := http.StatusCreated
	if !st.Certain() {
		status = http.StatusAccepted
	}
	if err != nil {
		info.Err = err
		if couch.IsTransient(err) || isCtxErr(err) {
			// The outcome is unknown, as for a single PUT that failed the
			// same way: each writer repeats its run after re-reading.
			for _, r := range batch {
				r.done <- writeResp{err: err}
			}
		} else {
			// The server refused the request as a whole (a 413 for a batch
			// larger than its request limit, a 417): nothing was written,
			// so each document is sent alone for its own precise answer.
			for _, r := range batch {
				b.putAlone(ctx, r, &info)
			}
		}
	} else {
		// Rows are matched by id: CouchDB answers in request order, PouchDB
		// Server does not. Ids in one batch are unique, since the queue
		// never runs one id on two workers.
		rows := make(map[string]kivik.BulkResult, len(results))
		for _, res := range results {
			rows[res.ID] = res
		}
		for _, r := range batch {
			res, ok := rows[r.id]
			switch {
			case ok && res.Error == nil && res.Rev != "":
				r.done <- writeResp{rev: res.Rev, status: status}
			case ok && couch.IsConflict(res.Error):
				info.Conflicts++
				r.done <- writeResp{err: res.Error}
			default:
				// kivik reports every other per-document error as a 500,
				// losing whether it was a validation function's 403 or a
				// too-large document, and a row may be missing or lack
				// its rev. Sent alone, the same compare-and-swap write
				// tells which; if the row was in fact written, it gets a
				// 409 and its writer re-reads, as after any conflict.
				b.putAlone(ctx, r, &info)
			}
		}
	}
	info.Duration = time.Since(began)
	if b.onFlush != nil {
		b.onFlush(info)
	}
}

// putAlone writes one document of a batch with a single PUT.
func (b *batcher) putAlone(ctx context.Context, r *writeReq, info *FlushInfo) {
	sctx, st := couch.RecordStatus(ctx)
	rev, err := b.db.Put(sctx, r.id, r.body)
	if couch.IsConflict(err) {
		info.Conflicts++
	}
	status := http.StatusCreated
	if !st.Certain() {
		status = http.StatusAccepted
	}
	r.done <- writeResp{rev: rev, err: err, status: status}
}

func isCtxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
