package metrics

import (
	"net/http"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// DefaultEngine is the engine label of OnRun and EmailSent when New is not
// given WithEngine; it is workflow.Options.Name's default.
const DefaultEngine = "docstate"

// DurationBuckets are the handler latency buckets in seconds: 1ms to 60s,
// dense enough around 10s for the slow-handler alert.
var DurationBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60}

// BatchSizeBuckets are the group commit size buckets, up to the largest
// engine.batch_size.
var BatchSizeBuckets = []float64{1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000}

// Email results accepted by EmailSent; anything else is counted as "other"
// so the label stays bounded.
const (
	EmailOK        = "ok"
	EmailTemporary = "temporary"
	EmailPermanent = "permanent"
	emailOther     = "other"
)

// Option configures New.
type Option func(*Metrics)

// WithEngine sets the engine label of OnRun and EmailSent (default
// DefaultEngine). Use the engine's workflow.Options.Name.
func WithEngine(name string) Option {
	return func(m *Metrics) { m.engine = name }
}

// Metrics is docstate's Prometheus instrumentation on a private registry.
type Metrics struct {
	engine   string
	reg      *prometheus.Registry
	runs     *prometheus.CounterVec
	duration *prometheus.HistogramVec
	batch    *prometheus.HistogramVec
	flush    *prometheus.HistogramVec
	emails   *prometheus.CounterVec
	channels *prometheus.CounterVec
	seeds    *prometheus.CounterVec
	provs    *prometheus.CounterVec
	repairs  *prometheus.CounterVec
	engines  *engineCollector
	handler  http.Handler
}

// New returns Metrics on a fresh private registry holding the Go and
// process collectors and docstate_build_info{version,goversion} = 1.
func New(version string, opts ...Option) *Metrics {
	m := &Metrics{engine: DefaultEngine, reg: prometheus.NewRegistry()}
	for _, o := range opts {
		o(m)
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "docstate_build_info",
		Help: "Always 1; the labels name the docstate version and the Go version it was built with.",
	}, []string{"version", "goversion"})
	build.WithLabelValues(version, runtime.Version()).Set(1)
	m.runs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_handler_runs_total",
		Help: "Handler runs by handler and result: ok, error (retried), terminal, panic or timeout.",
	}, []string{"engine", "type", "state", "mode", "result"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "docstate_handler_duration_seconds",
		Help:    "Duration of handler runs, whatever their result.",
		Buckets: DurationBuckets,
	}, []string{"engine", "type", "state", "mode"})
	m.batch = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "docstate_batch_size",
		Help:    "Document writes (results and claims) per group commit request (_bulk_docs).",
		Buckets: BatchSizeBuckets,
	}, []string{"engine"})
	m.flush = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "docstate_batch_flush_seconds",
		Help:    "Duration of group commit requests (_bulk_docs round trip, with any single-PUT fallbacks), by result: ok or failed (the whole request failed).",
		Buckets: DurationBuckets,
	}, []string{"engine", "result"})
	m.emails = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_emails_sent_total",
		Help: "Mails handed to the SMTP relay by result: ok, temporary (4xx or network, retried), permanent (5xx), other.",
	}, []string{"engine", "result"})
	m.channels = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_channels_provisioned_total",
		Help: "Channel databases created (or found) and secured, their _security read back and verified.",
	}, []string{"engine"})
	m.channels.WithLabelValues(m.engine)
	m.seeds = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_channel_seeds_total",
		Help: "Channel seed replications (_replicator, from a template) seen reaching a state: pending, running, completed, crashing, failed.",
	}, []string{"state"})
	m.provs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_provision_checks_total",
		Help: "Periodic provisioning runs (every engine.resync_interval) by result: ok or failed.",
	}, []string{"engine", "result"})
	m.repairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "docstate_provision_repairs_total",
		Help: "Provisioned things (a validation function, a design document) found missing or changed and written again, by handler set.",
	}, []string{"engine", "set"})
	for _, r := range []string{"ok", "failed"} {
		m.provs.WithLabelValues(m.engine, r)
	}
	for _, r := range []string{EmailOK, EmailTemporary, EmailPermanent} {
		m.emails.WithLabelValues(m.engine, r)
	}
	m.engines = newEngineCollector()
	m.reg.MustRegister(build, m.runs, m.duration, m.batch, m.flush, m.emails, m.channels, m.seeds, m.provs, m.repairs, m.engines)
	m.handler = promhttp.InstrumentMetricHandler(m.reg, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		Registry:          m.reg,
		ErrorHandling:     promhttp.ContinueOnError,
		EnableOpenMetrics: true,
	}))
	return m
}

// OnRun records one handler run under the engine label given to New. Pass
// it as workflow.Options.OnRun; it does not block.
func (m *Metrics) OnRun(r workflow.RunInfo) { m.observe(m.engine, r) }

// OnRunFor returns an OnRun func with its own engine label, for a process
// that runs several engines.
func (m *Metrics) OnRunFor(engine string) func(workflow.RunInfo) {
	return func(r workflow.RunInfo) { m.observe(engine, r) }
}

func (m *Metrics) observe(engine string, r workflow.RunInfo) {
	mode := r.Mode.String()
	m.runs.WithLabelValues(engine, r.Type, r.State, mode, r.Result).Inc()
	m.duration.WithLabelValues(engine, r.Type, r.State, mode).Observe(r.Duration.Seconds())
}

// OnFlush records one group commit under the engine label given to New.
// Pass it as workflow.Options.OnFlush; it does not block.
func (m *Metrics) OnFlush(f workflow.FlushInfo) { m.observeFlush(m.engine, f) }

// OnFlushFor returns an OnFlush func with its own engine label.
func (m *Metrics) OnFlushFor(engine string) func(workflow.FlushInfo) {
	return func(f workflow.FlushInfo) { m.observeFlush(engine, f) }
}

func (m *Metrics) observeFlush(engine string, f workflow.FlushInfo) {
	result := "ok"
	if f.Err != nil {
		result = "failed"
	}
	m.batch.WithLabelValues(engine).Observe(float64(f.Docs))
	m.flush.WithLabelValues(engine, result).Observe(f.Duration.Seconds())
}

// ChannelSeed counts a channel's seed replication reaching state (a
// bounded set: the states channels reports).
func (m *Metrics) ChannelSeed(state string) {
	switch state {
	case "pending", "running", "completed", "crashing", "failed":
	default:
		state = "other"
	}
	m.seeds.WithLabelValues(state).Inc()
}

// ChannelProvisioned counts one channel database provisioned and verified.
func (m *Metrics) ChannelProvisioned() { m.channels.WithLabelValues(m.engine).Inc() }

// ProvisionChecked counts one periodic provisioning run; failed tells how
// it ended.
func (m *Metrics) ProvisionChecked(failed bool) {
	result := "ok"
	if failed {
		result = "failed"
	}
	m.provs.WithLabelValues(m.engine, result).Inc()
}

// ProvisionRepaired counts n things set had to write again. Set names are
// the configured handler sets: a bounded label.
func (m *Metrics) ProvisionRepaired(set string, n int) {
	m.repairs.WithLabelValues(m.engine, set).Add(float64(n))
}

// EmailSent counts one mail attempt: result is EmailOK, EmailTemporary or
// EmailPermanent; any other value is counted as "other".
func (m *Metrics) EmailSent(result string) {
	switch result {
	case EmailOK, EmailTemporary, EmailPermanent:
	default:
		result = emailOther
	}
	m.emails.WithLabelValues(m.engine, result).Inc()
}

// WatchEngine exports the engine's workflow.Stats under engine=name: stats
// is called once per scrape, from the scraping goroutine, and must be safe
// for that (Engine.Stats is). Watching a name again replaces its func.
func (m *Metrics) WatchEngine(name string, stats func() workflow.Stats) {
	m.engines.set(name, func(w *watched) { w.stats = stats })
}

// WatchReady exports docstate_ready{engine=name}: 1 when ready returns nil,
// 0 otherwise. ready (Engine.Ready) is called once per scrape. Watching a
// name again replaces its func.
func (m *Metrics) WatchReady(name string, ready func() error) {
	m.engines.set(name, func(w *watched) { w.ready = ready })
}

// WatchSupervisor exports many-database mode's state under engine=name:
// databases watched, engines open and waiting, discoveries. stats is
// called once per scrape. No database name is ever a label.
func (m *Metrics) WatchSupervisor(name string, stats func() supervisor.Stats) {
	m.reg.MustRegister(supervisorCollector{name: name, stats: stats})
}

var (
	dbWatchedDesc = prometheus.NewDesc("docstate_databases_watched",
		"Databases matching databases.patterns (many-database mode).", []string{"engine"}, nil)
	dbOpenDesc = prometheus.NewDesc("docstate_databases_open",
		"Database engines (feeds) running now; at most databases.max_open.", []string{"engine"}, nil)
	dbWaitingDesc = prometheus.NewDesc("docstate_databases_waiting",
		"Databases with work waiting for an engine slot.", []string{"engine"}, nil)
	dbDiscoveriesDesc = prometheus.NewDesc("docstate_database_discoveries_total",
		"Discoveries (_all_dbs listings with update_seq comparison).", []string{"engine"}, nil)
	dbStartedDesc = prometheus.NewDesc("docstate_database_engines_started_total",
		"Database engines started.", []string{"engine"}, nil)
	dbStoppedDesc = prometheus.NewDesc("docstate_database_engines_stopped_total",
		"Database engines stopped: idle, yielding their slot, or database gone.", []string{"engine"}, nil)
)

type supervisorCollector struct {
	name  string
	stats func() supervisor.Stats
}

func (c supervisorCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dbWatchedDesc, dbOpenDesc, dbWaitingDesc, dbDiscoveriesDesc, dbStartedDesc, dbStoppedDesc} {
		ch <- d
	}
}

func (c supervisorCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- prometheus.MustNewConstMetric(dbWatchedDesc, gauge, float64(s.Watched), c.name)
	ch <- prometheus.MustNewConstMetric(dbOpenDesc, gauge, float64(s.Open), c.name)
	ch <- prometheus.MustNewConstMetric(dbWaitingDesc, gauge, float64(s.Waiting), c.name)
	ch <- prometheus.MustNewConstMetric(dbDiscoveriesDesc, counter, float64(s.Scans), c.name)
	ch <- prometheus.MustNewConstMetric(dbStartedDesc, counter, float64(s.Started), c.name)
	ch <- prometheus.MustNewConstMetric(dbStoppedDesc, counter, float64(s.Stopped), c.name)
}

// Handler serves the registry in the Prometheus text (or OpenMetrics)
// format, and counts its own scrapes.
func (m *Metrics) Handler() http.Handler { return m.handler }

// Registry is the private registry, to add collectors or gather in tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// watched is one engine's funcs.
type watched struct {
	stats func() workflow.Stats
	ready func() error
}

// engineCollector turns watched engines' Stats into const metrics at
// scrape time, one Stats call per engine per scrape.
type engineCollector struct {
	now func() time.Time

	mu      sync.Mutex
	engines map[string]*watched
}

type statDesc struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(s *workflow.Stats) float64
	label string // the result label value, for claims
}

var (
	claimsDesc = prometheus.NewDesc("docstate_claims_total",
		"Unsafe claim outcomes: won (claim written), lost (another engine's write won), held (a live claim of another owner), takeover (expired claim retried with the same key), expired (expired claim sent to the error state).",
		[]string{"engine", "result"}, nil)
	checkpointAgeDesc = prometheus.NewDesc("docstate_checkpoint_age_seconds",
		"Seconds since the checkpoint was last saved; absent until the first save of this engine.",
		[]string{"engine"}, nil)
	feedContactAgeDesc = prometheus.NewDesc("docstate_feed_contact_age_seconds",
		"Seconds since the server last answered a changes feed request (the feed's lag in time); absent until the first answer.",
		[]string{"engine"}, nil)
	readyDesc = prometheus.NewDesc("docstate_ready",
		"1 when the engine is following its feed (its readiness check passes), 0 otherwise.",
		[]string{"engine"}, nil)
)

func simple(name, help string, typ prometheus.ValueType, value func(s *workflow.Stats) int64) statDesc {
	return statDesc{
		desc:  prometheus.NewDesc(name, help, []string{"engine"}, nil),
		typ:   typ,
		value: func(s *workflow.Stats) float64 { return float64(value(s)) },
	}
}

func claim(result string, value func(s *workflow.Stats) int64) statDesc {
	return statDesc{desc: claimsDesc, typ: prometheus.CounterValue, label: result,
		value: func(s *workflow.Stats) float64 { return float64(value(s)) }}
}

const (
	counter = prometheus.CounterValue
	gauge   = prometheus.GaugeValue
)

// statDescs maps workflow.Stats onto metrics. Stats.Runs and RunErrors are
// left out: docstate_handler_runs_total (from OnRun) has them by result.
var statDescs = []statDesc{
	simple("docstate_changes_received_total", "Changes feed rows received.", counter, func(s *workflow.Stats) int64 { return s.ChangesReceived }),
	simple("docstate_transitions_total", "Handler results written to documents.", counter, func(s *workflow.Stats) int64 { return s.Transitions }),
	simple("docstate_noops_total", "Handler results that changed nothing and were not written.", counter, func(s *workflow.Stats) int64 { return s.Noops }),
	simple("docstate_batched_writes_total", "Document writes sent through group commit (_bulk_docs).", counter, func(s *workflow.Stats) int64 { return s.BatchedWrites }),
	simple("docstate_conflicts_total", "Writes rejected with 409 because the document moved on.", counter, func(s *workflow.Stats) int64 { return s.Conflicts }),
	claim("won", func(s *workflow.Stats) int64 { return s.ClaimsWon }),
	claim("lost", func(s *workflow.Stats) int64 { return s.ClaimsLost }),
	claim("held", func(s *workflow.Stats) int64 { return s.ClaimsHeld }),
	claim("takeover", func(s *workflow.Stats) int64 { return s.ClaimsTakenOver }),
	claim("expired", func(s *workflow.Stats) int64 { return s.ClaimsExpired }),
	claim("renewed", func(s *workflow.Stats) int64 { return s.ClaimsRenewed }),
	claim("released", func(s *workflow.Stats) int64 { return s.ClaimsReleased }),
	simple("docstate_members", "Live daemons seen on the database, this one included (0: membership off).", gauge, func(s *workflow.Stats) int64 { return s.Members }),
	simple("docstate_member_rebalances_total", "Changes of the live member set, each followed by a rescan for this daemon's share.", counter, func(s *workflow.Stats) int64 { return s.Rebalances }),
	simple("docstate_skipped_other_member_total", "Queued document ids passed over unread as another live member's.", counter, func(s *workflow.Stats) int64 { return s.SkippedOther }),
	simple("docstate_feed_body_fetches_total", "Requests for feed rows' bodies, with a feed read without bodies (several members, or engine.feed_without_bodies).", counter, func(s *workflow.Stats) int64 { return s.BodyFetches }),
	simple("docstate_feed_bodies_fetched_total", "Document bodies those requests brought.", counter, func(s *workflow.Stats) int64 { return s.BodiesFetched }),
	simple("docstate_feed_own_rows_total", "Feed rows of this daemon's own writes finished unread (nothing left to do, or superseded by its later write).", counter, func(s *workflow.Stats) int64 { return s.OwnRows }),
	simple("docstate_claims_waiting", "Unsafe claims written and waiting for a handler slot now.", gauge, func(s *workflow.Stats) int64 { return s.ClaimsWaiting }),
	claim("unproven", func(s *workflow.Stats) int64 { return s.ClaimsUnproven }),
	claim("proven", func(s *workflow.Stats) int64 { return s.ClaimsProven }),
	claim("yielded", func(s *workflow.Stats) int64 { return s.ClaimsYielded }),
	simple("docstate_conflict_branches_removed_total", "Losing branches of conflicted workflow documents removed (tombstoned) by the engine.", counter, func(s *workflow.Stats) int64 { return s.BranchesRemoved }),
	simple("docstate_conflicts_waiting_total", "Looks at conflicted documents left for later because a branch held a live claim.", counter, func(s *workflow.Stats) int64 { return s.ConflictsWaiting }),
	simple("docstate_feed_rewinds_total", "Changes feed answers whose sequence went back (a cluster shard copy lost); the changes are replayed.", counter, func(s *workflow.Stats) int64 { return s.SeqRewinds }),
	simple("docstate_results_dropped_total", "Unsafe handler results not written because the claim was lost meanwhile.", counter, func(s *workflow.Stats) int64 { return s.ResultsDropped }),
	simple("docstate_retries_total", "Failed handler runs recorded with a retry backoff.", counter, func(s *workflow.Stats) int64 { return s.RetriesScheduled }),
	simple("docstate_failed_total", "Documents moved to an error state.", counter, func(s *workflow.Stats) int64 { return s.Failed }),
	simple("docstate_invalid_docs_total", "Documents of a handled type recorded as invalid (state missing or not a string).", counter, func(s *workflow.Stats) int64 { return s.Invalid }),
	simple("docstate_skipped_docs_total", "Feed documents that are not workflow documents.", counter, func(s *workflow.Stats) int64 { return s.Skipped }),
	simple("docstate_transient_total", "Handler runs repeated because the server could not be reached.", counter, func(s *workflow.Stats) int64 { return s.Transient }),
	simple("docstate_panics_total", "Handler panics recovered.", counter, func(s *workflow.Stats) int64 { return s.Panics }),
	simple("docstate_feed_requests_total", "Changes feed (longpoll) requests answered.", counter, func(s *workflow.Stats) int64 { return s.FeedRequests }),
	simple("docstate_feed_reconnects_total", "Changes feed requests that failed; each is followed by a backoff and a reconnect.", counter, func(s *workflow.Stats) int64 { return s.FeedErrors }),
	simple("docstate_feed_resets_total", "Feed restarts from 0 because the database was re-created.", counter, func(s *workflow.Stats) int64 { return s.FeedResets }),
	simple("docstate_checkpoints_saved_total", "Checkpoint writes.", counter, func(s *workflow.Stats) int64 { return s.CheckpointsSaved }),
	simple("docstate_resync_queued_total", "Document ids queued by start and resync scans.", counter, func(s *workflow.Stats) int64 { return s.ResyncQueued }),
	simple("docstate_queue_depth", "Document ids waiting for a worker now.", gauge, func(s *workflow.Stats) int64 { return s.Queued }),
	simple("docstate_delayed", "Document ids waiting for a timer now (retries, wake-ups, claim expiries).", gauge, func(s *workflow.Stats) int64 { return s.Delayed }),
	simple("docstate_inflight", "Handler runs in progress now.", gauge, func(s *workflow.Stats) int64 { return s.Inflight }),
	simple("docstate_oversized_docs_total", "Documents refused as larger than engine.max_doc_bytes: not read whole, not written.", counter, func(s *workflow.Stats) int64 { return s.Oversized }),
	simple("docstate_pending_bytes", "Document bytes held now: feed bodies queued and documents in progress (bounded by engine.max_pending_bytes).", gauge, func(s *workflow.Stats) int64 { return s.PendingBytes }),
	simple("docstate_pending_changes", "Changes received and not yet passed by the checkpoint (the feed's lag in changes).", gauge, func(s *workflow.Stats) int64 { return s.Pending }),
}

func newEngineCollector() *engineCollector {
	return &engineCollector{now: time.Now, engines: map[string]*watched{}}
}

func (c *engineCollector) set(name string, f func(*watched)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.engines[name]
	if w == nil {
		w = &watched{}
		c.engines[name] = w
	}
	f(w)
}

// Describe implements prometheus.Collector.
func (c *engineCollector) Describe(ch chan<- *prometheus.Desc) {
	seen := map[*prometheus.Desc]bool{}
	for _, d := range statDescs {
		if !seen[d.desc] {
			seen[d.desc] = true
			ch <- d.desc
		}
	}
	ch <- checkpointAgeDesc
	ch <- feedContactAgeDesc
	ch <- readyDesc
}

// Collect implements prometheus.Collector.
func (c *engineCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	names := make([]string, 0, len(c.engines))
	funcs := make(map[string]watched, len(c.engines))
	for name, w := range c.engines {
		names = append(names, name)
		funcs[name] = *w
	}
	c.mu.Unlock()
	sort.Strings(names)
	now := c.now()
	for _, name := range names {
		w := funcs[name]
		if w.stats != nil {
			s := w.stats()
			for _, d := range statDescs {
				labels := []string{name}
				if d.label != "" {
					labels = append(labels, d.label)
				}
				ch <- prometheus.MustNewConstMetric(d.desc, d.typ, d.value(&s), labels...)
			}
			if !s.CheckpointSaved.IsZero() {
				ch <- prometheus.MustNewConstMetric(checkpointAgeDesc, gauge, age(now, s.CheckpointSaved), name)
			}
			if !s.FeedContact.IsZero() {
				ch <- prometheus.MustNewConstMetric(feedContactAgeDesc, gauge, age(now, s.FeedContact), name)
			}
		}
		if w.ready != nil {
			v := 0.0
			if w.ready() == nil {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(readyDesc, gauge, v, name)
		}
	}
}

// age is now - t in seconds, never negative (clock steps).
func age(now, t time.Time) float64 {
	if d := now.Sub(t); d > 0 {
		return d.Seconds()
	}
	return 0
}
