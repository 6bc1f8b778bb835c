package metrics

import (
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/docstate/docstate/workflow"
)

var clock = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// fakeStats has a distinct value per field, so a field wired to the wrong
// series shows.
func fakeStats() workflow.Stats {
	return workflow.Stats{
		ChangesReceived: 101, Runs: 102, RunErrors: 103, Panics: 104, Transitions: 105,
		Noops: 106, Conflicts: 107, ClaimsWon: 108, ClaimsLost: 109, ClaimsHeld: 110,
		ClaimsTakenOver: 111, ClaimsExpired: 112, ResultsDropped: 113, RetriesScheduled: 114,
		Failed: 115, Invalid: 116, Skipped: 117, Transient: 118, FeedRequests: 119,
		FeedErrors: 120, FeedResets: 121, CheckpointsSaved: 122, ResyncQueued: 123,
		Inflight: 124, Queued: 125, Delayed: 126, Pending: 127,
		ClaimsRenewed: 128, ClaimsReleased: 129, ClaimsWaiting: 130,
		Members: 131, Rebalances: 132, SkippedOther: 133, Oversized: 134, PendingBytes: 135,
		CheckpointSaved: clock.Add(-90 * time.Second),
		FeedContact:     clock.Add(-2500 * time.Millisecond),
	}
}

// fixture is a Metrics with one run, one mail and a watched engine "orders"
// on a fixed clock; calls counts Stats calls.
func fixture(t *testing.T, opts ...Option) (m *Metrics, calls *atomic.Int64) {
	t.Helper()
	m = New("v1.2.3", opts...)
	m.engines.now = func() time.Time { return clock }
	calls = new(atomic.Int64)
	m.WatchEngine("orders", func() workflow.Stats { calls.Add(1); return fakeStats() })
	m.WatchReady("orders", func() error { return nil })
	return m, calls
}

func families(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// value returns the value of the one series of family name whose labels
// include want; it fails when there is not exactly one.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	mf := fams[name]
	if mf == nil {
		t.Fatalf("%s not exported", name)
	}
	var found []*dto.Metric
	for _, m := range mf.GetMetric() {
		ls := labels(m)
		ok := true
		for k, v := range want {
			if ls[k] != v {
				ok = false
			}
		}
		if ok {
			found = append(found, m)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d series, want 1", name, want, len(found))
	}
	m := found[0]
	switch mf.GetType() {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_HISTOGRAM:
		return float64(m.GetHistogram().GetSampleCount())
	}
	t.Fatalf("%s: unexpected type %v", name, mf.GetType())
	return 0
}

func TestStatsExportedAsCountersAndGauges(t *testing.T) {
	m, calls := fixture(t)
	fams := families(t, m)
	if n := calls.Load(); n != 1 {
		t.Errorf("one gather called Stats %d times, want 1", n)
	}
	eng := map[string]string{"engine": "orders"}
	cases := []struct {
		name string
		typ  dto.MetricType
		want float64
	}{
		{"docstate_changes_received_total", dto.MetricType_COUNTER, 101},
		{"docstate_panics_total", dto.MetricType_COUNTER, 104},
		{"docstate_transitions_total", dto.MetricType_COUNTER, 105},
		{"docstate_noops_total", dto.MetricType_COUNTER, 106},
		{"docstate_conflicts_total", dto.MetricType_COUNTER, 107},
		{"docstate_results_dropped_total", dto.MetricType_COUNTER, 113},
		{"docstate_retries_total", dto.MetricType_COUNTER, 114},
		{"docstate_failed_total", dto.MetricType_COUNTER, 115},
		{"docstate_invalid_docs_total", dto.MetricType_COUNTER, 116},
		{"docstate_skipped_docs_total", dto.MetricType_COUNTER, 117},
		{"docstate_transient_total", dto.MetricType_COUNTER, 118},
		{"docstate_feed_requests_total", dto.MetricType_COUNTER, 119},
		{"docstate_feed_reconnects_total", dto.MetricType_COUNTER, 120},
		{"docstate_feed_resets_total", dto.MetricType_COUNTER, 121},
		{"docstate_checkpoints_saved_total", dto.MetricType_COUNTER, 122},
		{"docstate_resync_queued_total", dto.MetricType_COUNTER, 123},
		{"docstate_inflight", dto.MetricType_GAUGE, 124},
		{"docstate_queue_depth", dto.MetricType_GAUGE, 125},
		{"docstate_delayed", dto.MetricType_GAUGE, 126},
		{"docstate_pending_changes", dto.MetricType_GAUGE, 127},
		{"docstate_claims_waiting", dto.MetricType_GAUGE, 130},
		{"docstate_members", dto.MetricType_GAUGE, 131},
		{"docstate_member_rebalances_total", dto.MetricType_COUNTER, 132},
		{"docstate_skipped_other_member_total", dto.MetricType_COUNTER, 133},
		{"docstate_oversized_docs_total", dto.MetricType_COUNTER, 134},
		{"docstate_pending_bytes", dto.MetricType_GAUGE, 135},
		{"docstate_checkpoint_age_seconds", dto.MetricType_GAUGE, 90},
		{"docstate_feed_contact_age_seconds", dto.MetricType_GAUGE, 2.5},
		{"docstate_ready", dto.MetricType_GAUGE, 1},
	}
	for _, c := range cases {
		if got := fams[c.name].GetType(); got != c.typ {
			t.Errorf("%s is a %v, want %v", c.name, got, c.typ)
		}
		if got := value(t, fams, c.name, eng); got != c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	for result, want := range map[string]float64{"won": 108, "lost": 109, "held": 110, "takeover": 111, "expired": 112, "renewed": 128, "released": 129} {
		if got := value(t, fams, "docstate_claims_total", map[string]string{"engine": "orders", "result": result}); got != want {
			t.Errorf("claims_total{result=%q} = %v, want %v", result, got, want)
		}
	}
	if n := len(fams["docstate_claims_total"].GetMetric()); n != 10 {
		t.Errorf("claims_total has %d series, want 10", n)
	}
	// Runs and RunErrors are not exported twice.
	for name := range fams {
		if strings.Contains(name, "run_errors") || name == "docstate_runs_total" {
			t.Errorf("unexpected %s", name)
		}
	}
}

func TestAgesOmittedUntilKnownAndReadyZero(t *testing.T) {
	m := New("dev")
	s := fakeStats()
	s.CheckpointSaved, s.FeedContact = time.Time{}, time.Time{}
	m.WatchEngine("e1", func() workflow.Stats { return s })
	m.WatchReady("e1", func() error { return errors.New("the changes feed has not been read yet") })
	fams := families(t, m)
	for _, name := range []string{"docstate_checkpoint_age_seconds", "docstate_feed_contact_age_seconds"} {
		if fams[name] != nil {
			t.Errorf("%s exported while its time is zero: %v", name, fams[name])
		}
	}
	if got := value(t, fams, "docstate_ready", map[string]string{"engine": "e1"}); got != 0 {
		t.Errorf("ready = %v, want 0", got)
	}
	// A clock step backwards never gives a negative age.
	if a := age(clock, clock.Add(time.Minute)); a != 0 || math.Signbit(a) {
		t.Errorf("age of a future time = %v, want 0", a)
	}
}

func TestSeveralEnginesAndReplacement(t *testing.T) {
	m := New("dev")
	m.WatchEngine("a", func() workflow.Stats { return workflow.Stats{ChangesReceived: 1} })
	m.WatchEngine("b", func() workflow.Stats { return workflow.Stats{ChangesReceived: 2} })
	m.WatchEngine("a", func() workflow.Stats { return workflow.Stats{ChangesReceived: 3} }) // replaces
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP docstate_changes_received_total Changes feed rows received.
# TYPE docstate_changes_received_total counter
docstate_changes_received_total{engine="a"} 3
docstate_changes_received_total{engine="b"} 2
`), "docstate_changes_received_total"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.GatherAndCount(m.Registry(), "docstate_ready"); err != nil || n != 0 {
		t.Errorf("docstate_ready without WatchReady: %d series (%v), want 0", n, err)
	}
}

func TestOnRunCountsAndTimesRuns(t *testing.T) {
	m := New("dev", WithEngine("orders"))
	m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "ok", Duration: 3 * time.Millisecond})
	m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "ok", Duration: 40 * time.Millisecond})
	m.OnRun(workflow.RunInfo{Type: "device", State: "new", Mode: workflow.Unsafe, Result: "timeout", Duration: 30 * time.Second})
	m.OnRunFor("other")(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "panic", Duration: time.Millisecond})

	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP docstate_handler_runs_total Handler runs by handler and result: ok, error (retried), terminal, panic or timeout.
# TYPE docstate_handler_runs_total counter
docstate_handler_runs_total{engine="orders",mode="safe",result="ok",state="new",type="order"} 2
docstate_handler_runs_total{engine="orders",mode="unsafe",result="timeout",state="new",type="device"} 1
docstate_handler_runs_total{engine="other",mode="safe",result="panic",state="new",type="order"} 1
`), "docstate_handler_runs_total"); err != nil {
		t.Error(err)
	}
	fams := families(t, m)
	mf := fams["docstate_handler_duration_seconds"]
	if mf.GetType() != dto.MetricType_HISTOGRAM {
		t.Fatalf("duration is a %v", mf.GetType())
	}
	for _, s := range mf.GetMetric() {
		ls := labels(s)
		if _, ok := ls["result"]; ok {
			t.Errorf("duration has a result label: %v", ls)
		}
		h := s.GetHistogram()
		if ls["type"] == "order" && ls["engine"] == "orders" {
			if h.GetSampleCount() != 2 || math.Abs(h.GetSampleSum()-0.043) > 1e-9 {
				t.Errorf("order/new: count %d sum %v, want 2 and 0.043", h.GetSampleCount(), h.GetSampleSum())
			}
			// 3ms falls in the 5ms bucket, 40ms in 50ms.
			for _, b := range h.GetBucket() {
				if b.GetUpperBound() == 0.005 && b.GetCumulativeCount() != 1 {
					t.Errorf("le=0.005 holds %d, want 1", b.GetCumulativeCount())
				}
			}
		}
		if ls["type"] == "device" && h.GetSampleSum() != 30 {
			t.Errorf("device/new sum %v, want 30", h.GetSampleSum())
		}
		if got := len(h.GetBucket()); got != len(DurationBuckets) {
			t.Errorf("%d buckets, want %d", got, len(DurationBuckets))
		}
	}
	if DurationBuckets[0] != 0.001 || DurationBuckets[len(DurationBuckets)-1] != 60 {
		t.Errorf("buckets %v do not span 1ms..60s", DurationBuckets)
	}
}

func TestEmailSentBoundedResults(t *testing.T) {
	m := New("dev")
	if n, err := testutil.GatherAndCount(m.Registry(), "docstate_emails_sent_total"); err != nil || n != 3 {
		t.Fatalf("emails before any mail: %d series (%v), want 3 zeros", n, err)
	}
	m.EmailSent(EmailOK)
	m.EmailSent(EmailOK)
	m.EmailSent(EmailTemporary)
	m.EmailSent("alice@example.com") // a caller bug must not become a label
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(`
# HELP docstate_emails_sent_total Mails handed to the SMTP relay by result: ok, temporary (4xx or network, retried), permanent (5xx), other.
# TYPE docstate_emails_sent_total counter
docstate_emails_sent_total{engine="docstate",result="ok"} 2
docstate_emails_sent_total{engine="docstate",result="other"} 1
docstate_emails_sent_total{engine="docstate",result="permanent"} 0
docstate_emails_sent_total{engine="docstate",result="temporary"} 1
`), "docstate_emails_sent_total"); err != nil {
		t.Error(err)
	}
}

func TestBuildInfo(t *testing.T) {
	m := New("v1.2.3")
	want := `
# HELP docstate_build_info Always 1; the labels name the docstate version and the Go version it was built with.
# TYPE docstate_build_info gauge
docstate_build_info{goversion="` + runtime.Version() + `",version="v1.2.3"} 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), "docstate_build_info"); err != nil {
		t.Error(err)
	}
}

// allowedLabels are the only label names docstate series may have: all of
// them bounded. A document id, an email address or a code could only
// appear under some other name.
var allowedLabels = map[string]bool{
	"engine": true, "type": true, "state": true, "mode": true, "result": true,
	"version": true, "goversion": true,
	"set": true, // handler set names: the configured sets, a handful
}

func TestLabelsBounded(t *testing.T) {
	m, _ := fixture(t)
	const docID = "order-7f3a9c2e-0001"
	// RunInfo has no id field; a run of a real engine gives type and
	// state from its spec.
	m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "error", Duration: time.Second})
	m.EmailSent(EmailPermanent)
	m.ProvisionRepaired("devices", 1)
	allowedValues := map[string]map[string]bool{
		"engine": {"orders": true, "docstate": true},
		"type":   {"order": true},
		"state":  {"new": true},
		"mode":   {"safe": true, "unsafe": true},
		"result": {"ok": true, "error": true, "terminal": true, "panic": true, "timeout": true,
			"won": true, "lost": true, "held": true, "takeover": true, "expired": true, "renewed": true, "released": true,
			"unproven": true, "proven": true, "yielded": true,
			"temporary": true, "permanent": true, "other": true, "failed": true},
		"set":       {"devices": true},
		"version":   {"v1.2.3": true},
		"goversion": {runtime.Version(): true},
	}
	docstate := 0
	for name, mf := range families(t, m) {
		if !strings.HasPrefix(name, "docstate_") {
			continue
		}
		docstate++
		for _, s := range mf.GetMetric() {
			for _, l := range s.GetLabel() {
				if !allowedLabels[l.GetName()] {
					t.Errorf("%s has label %q, not in the allow-list", name, l.GetName())
				}
				if !allowedValues[l.GetName()][l.GetValue()] {
					t.Errorf("%s{%s=%q}: unexpected value", name, l.GetName(), l.GetValue())
				}
				if strings.Contains(l.GetValue(), docID) || strings.Contains(l.GetValue(), "@") {
					t.Errorf("%s{%s=%q} looks like a doc id or address", name, l.GetName(), l.GetValue())
				}
			}
			if name != "docstate_build_info" && labels(s)["engine"] == "" {
				t.Errorf("%s%v has no engine label", name, labels(s))
			}
		}
	}
	if docstate < 28 {
		t.Errorf("%d docstate_* families, want at least 28", docstate)
	}
}

func TestHandlerServesTextFormat(t *testing.T) {
	m, _ := fixture(t)
	m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "ok", Duration: 2 * time.Millisecond})
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()

	res, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("status %d: %s", res.StatusCode, body)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("content type %q, want the text format", ct)
	}
	text := string(body)
	for _, want := range []string{
		"# TYPE docstate_changes_received_total counter",
		`docstate_changes_received_total{engine="orders"} 101`,
		`docstate_claims_total{engine="orders",result="takeover"} 111`,
		`docstate_feed_reconnects_total{engine="orders"} 120`,
		`docstate_queue_depth{engine="orders"} 125`,
		`docstate_checkpoint_age_seconds{engine="orders"} 90`,
		`docstate_ready{engine="orders"} 1`,
		`docstate_handler_runs_total{engine="docstate",mode="safe",result="ok",state="new",type="order"} 1`,
		`docstate_handler_duration_seconds_bucket{engine="docstate",mode="safe",state="new",type="order",le="0.0025"} 1`,
		`docstate_emails_sent_total{engine="docstate",result="ok"} 0`,
		"docstate_build_info{",
		"go_goroutines ",
		"process_start_time_seconds ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
	// The handler counts its own scrapes, and a second scrape works (the
	// counter registration is not repeated).
	res, err = http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	if !strings.Contains(string(body), `promhttp_metric_handler_requests_total{code="200"} 1`) {
		t.Errorf("second scrape lacks the scrape counter")
	}
}

// TestConcurrentScrapesAndRuns is for -race: OnRun on workers, WatchEngine
// and scrapes at once.
func TestConcurrentScrapesAndRuns(t *testing.T) {
	m, _ := fixture(t)
	done := make(chan struct{})
	for i := 0; i < 4; i++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for j := 0; j < 200; j++ {
				m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "ok", Duration: time.Millisecond})
				m.EmailSent(EmailOK)
			}
		}()
	}
	go func() {
		defer func() { done <- struct{}{} }()
		for j := 0; j < 50; j++ {
			m.WatchEngine("orders", fakeStats)
			m.WatchReady("orders", func() error { return nil })
		}
	}()
	for j := 0; j < 20; j++ {
		if _, err := m.Registry().Gather(); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		<-done
	}
	if got := testutil.ToFloat64(m.runs.WithLabelValues("docstate", "order", "new", "safe", "ok")); got != 800 {
		t.Errorf("runs = %v, want 800", got)
	}
}

func TestOnFlushRecordsBatchSizeAndFlushLatencyByResult(t *testing.T) {
	m := New("test")
	m.OnFlush(workflow.FlushInfo{Docs: 200, Duration: 20 * time.Millisecond})
	m.OnFlush(workflow.FlushInfo{Docs: 3, Duration: time.Second, Err: errors.New("connection refused")})
	m.OnFlushFor("other")(workflow.FlushInfo{Docs: 1, Duration: time.Millisecond})
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]uint64{}
	var sizeSum float64
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			h := mt.GetHistogram()
			if h == nil || !strings.HasPrefix(mf.GetName(), "docstate_batch_") {
				continue
			}
			key := mf.GetName()
			for _, l := range mt.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			got[key] = h.GetSampleCount()
			if mf.GetName() == "docstate_batch_size" && strings.Contains(key, "engine=docstate") {
				sizeSum = h.GetSampleSum()
			}
		}
	}
	want := map[string]uint64{
		"docstate_batch_size,engine=docstate":                        2,
		"docstate_batch_size,engine=other":                           1,
		"docstate_batch_flush_seconds,engine=docstate,result=ok":     1,
		"docstate_batch_flush_seconds,engine=docstate,result=failed": 1,
		"docstate_batch_flush_seconds,engine=other,result=ok":        1,
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("series %v, want %v", got, want)
	}
	if sizeSum != 203 {
		t.Fatalf("batch size sum %v, want 203", sizeSum)
	}
}
