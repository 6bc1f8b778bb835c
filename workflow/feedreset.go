package workflow

import (
	"context"
	"errors"
	"strconv"
	"strings"
)

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
	// Revisions written in the old database say nothing about the new one.
	e.ownRevs.reset()
	e.log.Warn("feed restarted from 0 in a re-created database")
	return "0"
}
