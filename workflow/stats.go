package workflow

import (
	"sync/atomic"
	"time"
)

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
