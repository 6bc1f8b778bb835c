// Package metrics is docstate's Prometheus instrumentation.
//
// A Metrics holds a private prometheus.Registry (never the global default
// one) with the Go and process collectors and docstate_build_info. The
// daemon wires it up once per process:
//
//	m := metrics.New(version)                  // WithEngine(name) sets the engine label of OnRun and EmailSent
//	opts.OnRun = m.OnRun                        // workflow.Options.OnRun: runs and latency
//	eng, _ := workflow.New(db, reg, opts)
//	m.WatchEngine(opts.Name, eng.Stats)         // counters and gauges read at scrape time
//	m.WatchReady(opts.Name, eng.Ready)          // docstate_ready
//	mux.Handle("/metrics", m.Handler())
//
// Engine counters are not duplicated here: one custom collector per scrape
// calls each watched engine's Stats func exactly once and turns the snapshot
// into const metrics. Counters in workflow.Stats are monotonic for the life
// of an engine, so they are exposed as Prometheus counters (a new engine in
// the same process starts again at 0, which rate() treats as a reset).
//
// # Labels
//
// Labels are bounded: the only label names are engine, type, state, mode,
// result, version and goversion. type and state come from registered
// handler specs (workflow.RunInfo carries no document id by construction),
// result from fixed sets. No document id, email address, code or token is
// ever a label value.
//
// # Metrics
//
//	name                                   type       labels
//	docstate_build_info                    gauge      version, goversion (always 1)
//	docstate_handler_runs_total            counter    engine, type, state, mode, result (ok|error|terminal|panic|timeout)
//	docstate_handler_duration_seconds      histogram  engine, type, state, mode (buckets 1ms..60s)
//	docstate_emails_sent_total             counter    engine, result (ok|temporary|permanent|other)
//	docstate_changes_received_total        counter    engine
//	docstate_transitions_total             counter    engine
//	docstate_noops_total                   counter    engine
//	docstate_conflicts_total               counter    engine
//	docstate_claims_total                  counter    engine, result (won|lost|held|takeover|expired)
//	docstate_results_dropped_total         counter    engine
//	docstate_retries_total                 counter    engine
//	docstate_failed_total                  counter    engine
//	docstate_invalid_docs_total            counter    engine
//	docstate_skipped_docs_total            counter    engine
//	docstate_transient_total               counter    engine
//	docstate_panics_total                  counter    engine
//	docstate_feed_requests_total           counter    engine
//	docstate_feed_reconnects_total         counter    engine
//	docstate_feed_resets_total             counter    engine
//	docstate_checkpoints_saved_total       counter    engine
//	docstate_resync_queued_total           counter    engine
//	docstate_queue_depth                   gauge      engine
//	docstate_delayed                       gauge      engine
//	docstate_inflight                      gauge      engine
//	docstate_pending_changes               gauge      engine
//	docstate_oversized_docs_total          counter    engine
//	docstate_pending_bytes                 gauge      engine
//	docstate_checkpoint_age_seconds        gauge      engine (absent until the first checkpoint save)
//	docstate_feed_contact_age_seconds      gauge      engine (absent until the feed first answered)
//	docstate_ready                         gauge      engine (1 ready, 0 not)
//
// docstate_feed_reconnects_total counts failed feed requests
// (workflow.Stats.FeedErrors): each is followed by a backoff and a
// reconnect, which is what an operator watches. docstate_pending_changes is
// the feed lag in changes (received and not yet checkpointed) and
// docstate_feed_contact_age_seconds the lag in time since the server last
// answered the feed; there is no docstate_feed_lag_seconds because the
// feed's seqs are opaque.
//
// The two age gauges are omitted, not NaN, while their time is unknown
// (zero in Stats): an absent series draws as a gap and never compares true
// in an alert, whereas NaN would propagate through sums. The alert rules
// cover the unknown case separately (docstate_ready for the feed, pending
// changes with no checkpoint age for the checkpoint).
//
// Handler runs are only counted when OnRun is wired into workflow.Options;
// workflow.Stats.Runs and RunErrors are deliberately not exported a second
// time.
package metrics
