package metrics

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	yaml "go.yaml.in/yaml/v3"

	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

const (
	dashboardFile = "../../deploy/grafana/docstate.json"
	alertsFile    = "../../deploy/prometheus/alerts.yml"
)

// metricName matches a docstate metric name; a trailing _ or : (prose like
// "docstate_*" or "docstate_build_info:") is not part of it.
var metricName = regexp.MustCompile(`\bdocstate_[a-zA-Z0-9_]*[a-zA-Z0-9]`)

// exported gathers a Metrics fed with a run, a mail and a watched engine
// whose times are known, so every series it can export is there. It maps
// each family name to its type.
func exported(t *testing.T) map[string]dto.MetricType {
	t.Helper()
	m := New("test")
	m.OnRun(workflow.RunInfo{Type: "order", State: "new", Mode: workflow.Safe, Result: "ok", Duration: time.Millisecond})
	m.EmailSent(EmailOK)
	m.OnFlush(workflow.FlushInfo{Docs: 10, Duration: time.Millisecond})
	s := fakeStats()
	s.CheckpointSaved, s.FeedContact = time.Now(), time.Now()
	m.WatchEngine("docstate", func() workflow.Stats { return s })
	m.WatchReady("docstate", func() error { return nil })
	m.WatchSupervisor("docstate", func() supervisor.Stats { return supervisor.Stats{Watched: 3, Open: 1} })
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]dto.MetricType{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf.GetType()
	}
	return out
}

// unknownNames returns the names in refs that are neither an exported
// family nor a _bucket/_sum/_count series of an exported histogram or
// summary, sorted.
func unknownNames(refs []string, fams map[string]dto.MetricType) []string {
	var bad []string
	seen := map[string]bool{}
	for _, name := range refs {
		if seen[name] {
			continue
		}
		seen[name] = true
		if _, ok := fams[name]; ok {
			continue
		}
		ok := false
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			base, cut := strings.CutSuffix(name, suffix)
			if !cut {
				continue
			}
			if typ, found := fams[base]; found && (typ == dto.MetricType_HISTOGRAM || typ == dto.MetricType_SUMMARY ||
				typ == dto.MetricType_GAUGE_HISTOGRAM) && (suffix != "_bucket" || typ != dto.MetricType_SUMMARY) {
				ok = true
			}
		}
		if !ok {
			bad = append(bad, name)
		}
	}
	sort.Strings(bad)
	return bad
}

// dashboardExprs returns every PromQL expression of the dashboard: panel
// targets (rows included) and query variables.
func dashboardExprs(t *testing.T, data []byte) []string {
	t.Helper()
	var dash struct {
		SchemaVersion int               `json:"schemaVersion"`
		Panels        []json.RawMessage `json:"panels"`
		Templating    struct {
			List []struct {
				Name       string          `json:"name"`
				Type       string          `json:"type"`
				Definition string          `json:"definition"`
				Query      json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d, want a current one", dash.SchemaVersion)
	}
	vars := map[string]bool{}
	var exprs []string
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
		if v.Type != "query" {
			continue
		}
		exprs = append(exprs, v.Definition)
		var q struct {
			Query string `json:"query"`
		}
		if json.Unmarshal(v.Query, &q) == nil {
			exprs = append(exprs, q.Query)
		} else {
			var s string
			_ = json.Unmarshal(v.Query, &s)
			exprs = append(exprs, s)
		}
	}
	for _, want := range []string{"datasource", "engine"} {
		if !vars[want] {
			t.Errorf("dashboard lacks the %q variable", want)
		}
	}
	type panel struct {
		Title   string            `json:"title"`
		Type    string            `json:"type"`
		Panels  []json.RawMessage `json:"panels"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	}
	var walk func([]json.RawMessage)
	walk = func(raws []json.RawMessage) {
		for _, raw := range raws {
			var p panel
			if err := json.Unmarshal(raw, &p); err != nil {
				t.Fatalf("panel: %v", err)
			}
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("panel %q has no queries", p.Title)
			}
			for _, tg := range p.Targets {
				if tg.Expr == "" {
					t.Errorf("panel %q has an empty query", p.Title)
				}
				if p.Type != "row" && strings.Contains(tg.Expr, "docstate_") && !strings.Contains(tg.Expr, "$engine") &&
					!strings.Contains(tg.Expr, "docstate_build_info") {
					t.Errorf("panel %q query ignores $engine: %s", p.Title, tg.Expr)
				}
				exprs = append(exprs, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	return exprs
}

// alertExprs returns every rule's expression, and checks the rules the
// daemon's operators rely on are there.
func alertExprs(t *testing.T, data []byte) []string {
	t.Helper()
	var file struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Record      string            `yaml:"record"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&file); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	var exprs []string
	alerts := map[string]bool{}
	for _, g := range file.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" && r.Record == "" || strings.TrimSpace(r.Expr) == "" {
				t.Errorf("group %s: rule %q without a name or expression", g.Name, r.Alert)
			}
			if r.For != "" {
				if _, err := time.ParseDuration(r.For); err != nil {
					t.Errorf("rule %s: for %q: %v", r.Alert, r.For, err)
				}
			}
			if r.Alert != "" && (r.Labels["severity"] == "" || r.Annotations["summary"] == "") {
				t.Errorf("rule %s lacks a severity or summary", r.Alert)
			}
			alerts[r.Alert] = true
			exprs = append(exprs, r.Expr)
		}
	}
	for _, want := range []string{"DocstateFeedStalled", "DocstateErrorDocsGrowing", "DocstateClaimExpiries", "DocstateHandlerSlow", "DocstateCheckpointStale"} {
		if !alerts[want] {
			t.Errorf("alert %s missing", want)
		}
	}
	return exprs
}

func referencedNames(exprs []string) []string {
	var names []string
	for _, e := range exprs {
		names = append(names, metricName.FindAllString(e, -1)...)
	}
	return names
}

// TestDeployFilesNameExportedMetrics checks that every docstate_* metric
// the Grafana dashboard and the alert rules query is one Metrics exports.
func TestDeployFilesNameExportedMetrics(t *testing.T) {
	fams := exported(t)
	for _, f := range []struct {
		path  string
		exprs func(*testing.T, []byte) []string
		min   int
	}{
		{dashboardFile, dashboardExprs, 20},
		{alertsFile, alertExprs, 6},
	} {
		t.Run(filepath.Base(f.path), func(t *testing.T) {
			data, err := os.ReadFile(f.path)
			if err != nil {
				t.Fatal(err)
			}
			names := referencedNames(f.exprs(t, data))
			if len(names) < f.min {
				t.Fatalf("found only %d metric references, want at least %d: is the parser broken?", len(names), f.min)
			}
			if bad := unknownNames(names, fams); len(bad) > 0 {
				t.Errorf("%s names metrics docstate does not export: %v", f.path, bad)
			}
			// Names in descriptions, legends and comments must be real too.
			if bad := unknownNames(metricName.FindAllString(string(data), -1), fams); len(bad) > 0 {
				t.Errorf("%s mentions metrics docstate does not export: %v", f.path, bad)
			}
		})
	}
}

// TestUnknownNamesCatchesMisspellings proves the check above fails on a
// misspelled, a suffixed non-histogram and an unexported name.
func TestUnknownNamesCatchesMisspellings(t *testing.T) {
	fams := exported(t)
	exprs := []string{
		`rate(docstate_changes_recieved_total[5m])`,                                    // misspelled
		`histogram_quantile(0.99, rate(docstate_handler_duration_seconds_bucket[5m]))`, // fine
		`docstate_handler_duration_seconds_count`,                                      // fine
		`docstate_queue_depth_count`,                                                   // a gauge has no _count
		`docstate_feed_lag_seconds`,                                                    // not exported
		`docstate_ready == 0`,                                                          // fine
	}
	got := unknownNames(referencedNames(exprs), fams)
	want := []string{"docstate_changes_recieved_total", "docstate_feed_lag_seconds", "docstate_queue_depth_count"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("unknown names %v, want %v", got, want)
	}
}
