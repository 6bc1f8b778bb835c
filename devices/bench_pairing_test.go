package devices

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// recordingMailer sends through the real SMTP mock and tells the benchmark
// when each mail was accepted, with its text.
type recordingMailer struct {
	Mailer
	sent chan Message
}

func (r recordingMailer) Send(ctx context.Context, m Message) error {
	if err := r.Mailer.Send(ctx, m); err != nil {
		return err
	}
	r.sent <- m
	return nil
}

// BenchmarkPairing pairs BENCH_DEVICES devices (default 400) of half as
// many owners on one daemon in the users mode (an engine on the control
// database, the followers of _users and of every owner's control
// database), each device as the protocol has it: an anonymous sign-up of
// its own _users document, the code read from the mail the daemon sent
// through SMTP, the confirmation written on its own user document with its
// own credentials. The devices here are Go HTTP clients, not PouchDB (a
// thousand Node processes would measure Node); the real device is in
// TestDevicePairsThroughItsOwnUserAndRevokesByReplication.
//
// The daemon runs as deployed: the engines', supervisor's and heal loop's
// default intervals (resync 1m, discovery 10s, idle stop 30s, heal 1m), and
// through the /_db_updates front, as on Apache CouchDB (PouchDB Server has
// no /_db_updates, and without it discovery reads every owner database's
// info each interval). BENCH_TEST_INTERVALS=1 runs it with the tests' fast
// intervals instead (resync 300ms, discovery 300ms, heal 500ms), as the
// first figures were taken; BENCH_VERBOSE=1 logs the daemon's requests by
// kind.
//
// Reports pairings/s, the server's raw PUT rate at 16 writers in the same
// run, p50/p99 from sign-up to mail and from confirmation to active, the
// daemon's heap per owner, the documents written per pairing (update
// sequences of _users, the control database and the owners' databases)
// and the daemon's and the devices' requests per pairing (counted by a
// front the daemon and devices talk through):
//
//	BENCH_DEVICES=10000 go test -run '^$' -bench Pairing -benchtime 1x -timeout 60m ./devices/
func BenchmarkPairing(b *testing.B) {
	n := 400
	if v, err := strconv.Atoi(os.Getenv("BENCH_DEVICES")); err == nil && v > 1 {
		n = v
	}
	owners := n / 2
	mock := mailtest.StartMock(b, mailtest.MockOptions{})
	rec := recordingMailer{Mailer: mockMailer(b, mock), sent: make(chan Message, n*2)}
	direct := couchtest.Client(b)
	raw := rawPutRate(b, couchtest.NewDB(b, direct), 2000, 16)
	front := newCountingFront(b, couchtest.NewDBUpdatesServer(b).Options())
	client, err := couch.NewClient(front.opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = client.Close() })
	testIntervals := os.Getenv("BENCH_TEST_INTERVALS") != ""
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	heapBefore := heapInUse()
	s := startUsersStackOn(b, mock, rec, stackOptions{client: client,
		devices: func(o *Options) {
			o.Logger = quiet
			o.GlobalSends, o.GlobalWindow = n*4, time.Hour
			o.AddressSends = 1000
			// A code must outlive the queue in front of its confirmation.
			o.CodeTTL = time.Hour
			o.PublicURL = front.opts.URL
		},
		engine: func(o *workflow.Options) {
			if !testIntervals {
				*o = workflow.Options{HandlerTimeout: 30 * time.Second}
			}
			o.Logger = quiet
		},
		followers: func(o *FollowerOptions) {
			if !testIntervals {
				o.Supervisor, o.HealInterval = supervisor.Options{}, 0
			}
		},
	})
	ctx := context.Background()
	tag := randomHex(b, 4)
	server := front.opts.URL
	user := func(i int) string { return fmt.Sprintf("bp%s-%d", tag, i) }
	owner := func(i int) string { return fmt.Sprintf("bp%s-%d@example.test", tag, i/2) }
	seqBefore := seqSum(b, direct, s.db.Name())
	control := direct.DB(s.db.Name())

	var mu sync.Mutex
	signedUp, mailed, confirmed, active := map[string]time.Time{}, map[string]time.Time{}, map[string]time.Time{}, map[string]time.Time{}
	hc := &http.Client{Timeout: 30 * time.Second}
	put := func(url, u, pw string, doc any) (int, error) {
		body, _ := json.Marshal(doc)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, url, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if u != "" {
			req.SetBasicAuth(u, pw)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}

	// The devices' side: confirm each code as it is mailed.
	called := regexp.MustCompile(`a device called "([^"]+)"`)
	var wg sync.WaitGroup
	confirmErr := make(chan error, 1)
	confirms := make(chan Message, n*2)
	wg.Go(func() {
		for m := range rec.sent {
			confirms <- m
		}
		close(confirms)
	})
	for range 16 {
		wg.Go(func() {
			for m := range confirms {
				name := called.FindStringSubmatch(m.Text)
				if name == nil {
					continue
				}
				u := name[1]
				mu.Lock()
				if _, ok := mailed[u]; ok {
					mu.Unlock()
					continue // a resend
				}
				mailed[u] = time.Now()
				mu.Unlock()
				code := codeIn(b, m.Text)
				for range 20 {
					doc, err := getAs(ctx, hc, server+"/_users/org.couchdb.user:"+u, u, u+"-pw")
					if err != nil {
						select {
						case confirmErr <- err:
						default:
						}
						break
					}
					p, _ := doc[FieldPairing].(map[string]any)
					p["confirm_attempt"] = code
					doc["password"] = u + "-pw"
					at := time.Now()
					st, err := put(server+"/_users/org.couchdb.user:"+u, u, u+"-pw", doc)
					if err == nil && st == 201 {
						mu.Lock()
						confirmed[u] = at
						mu.Unlock()
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	defer func() {
		close(rec.sent)
		wg.Wait()
	}()

	b.ResetTimer()
	front.reset()
	began := time.Now()
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	var swg sync.WaitGroup
	for range 16 {
		swg.Go(func() {
			for i := range work {
				u := user(i)
				mu.Lock()
				signedUp[u] = time.Now()
				mu.Unlock()
				st, err := put(server+"/_users/org.couchdb.user:"+u, "", "", map[string]any{
					"_id": "org.couchdb.user:" + u, "name": u, "password": u + "-pw", "type": "user", "roles": []string{},
					"state": UserState, FieldPairing: map[string]any{"owner": owner(i), "device_name": u},
				})
				if err != nil || st != 201 {
					b.Errorf("sign up %s: %d %v", u, st, err)
					return
				}
			}
		})
	}
	swg.Wait()
	signups := float64(n) / time.Since(began).Seconds()

	// Active is when the trusted document says so.
	deadline := time.Now().Add(30 * time.Minute)
	for {
		rows := control.AllDocs(ctx, kivik.Params(map[string]any{"include_docs": true, "startkey": trustedPrefix + "bp" + tag, "endkey": trustedPrefix + "bp" + tag + "\ufff0"}))
		for rows.Next() {
			var d struct {
				User  string `json:"couch_user"`
				State string `json:"state"`
			}
			if rows.ScanDoc(&d) == nil && d.State == StateActive {
				id, _ := rows.ID()
				u := strings.TrimPrefix(id, trustedPrefix)
				mu.Lock()
				if _, ok := active[u]; !ok {
					active[u] = time.Now()
				}
				mu.Unlock()
			}
		}
		_ = rows.Close()
		mu.Lock()
		got := len(active)
		mu.Unlock()
		if got == n {
			break
		}
		select {
		case err := <-confirmErr:
			b.Fatalf("confirm: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d active after 30m", got, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	elapsed := time.Since(began)
	b.StopTimer()
	daemonReqs, deviceReqs := front.counts()
	if os.Getenv("BENCH_VERBOSE") != "" {
		fmt.Fprintf(os.Stderr, "requests by kind:\n%s", front.table())
	}
	heapAfter := heapInUse()
	writes := seqSum(b, direct, s.db.Name()) - seqBefore

	mu.Lock()
	defer mu.Unlock()
	var toMail, toActive []time.Duration
	for u, at := range signedUp {
		toMail = append(toMail, mailed[u].Sub(at))
		toActive = append(toActive, active[u].Sub(confirmed[u]))
	}
	slices.Sort(toMail)
	slices.Sort(toActive)
	pct := func(d []time.Duration, p int) float64 { return float64(d[len(d)*p/100].Milliseconds()) }
	b.ReportMetric(float64(n)/elapsed.Seconds(), "pairings/s")
	b.ReportMetric(raw, "raw-put/s")
	b.ReportMetric(signups, "signups/s")
	b.ReportMetric(pct(toMail, 50), "mail-p50-ms")
	b.ReportMetric(pct(toMail, 99), "mail-p99-ms")
	b.ReportMetric(pct(toActive, 50), "active-p50-ms")
	b.ReportMetric(pct(toActive, 99), "active-p99-ms")
	b.ReportMetric(float64(heapAfter-heapBefore)/1024/float64(owners), "heap-KiB/owner")
	b.ReportMetric(float64(writes)/float64(n), "writes/pairing")
	b.ReportMetric(float64(daemonReqs)/float64(n), "daemon-reqs/pairing")
	b.ReportMetric(float64(deviceReqs)/float64(n), "device-reqs/pairing")
}

// countingFront passes every request to the server it fronts and counts
// them: the server admin's (the daemon's) and everyone else's (the
// devices'), and by kind (method, database class, endpoint).
type countingFront struct {
	opts couch.Options

	mu             sync.Mutex
	daemon, device int
	kinds          map[string]int
}

func newCountingFront(tb testing.TB, opts couch.Options) *countingFront {
	tb.Helper()
	target, err := url.Parse(opts.URL)
	if err != nil {
		tb.Fatal(err)
	}
	f := &countingFront{kinds: map[string]int{}}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.ErrorLog = log.New(io.Discard, "", 0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.count(r, opts.Username)
		proxy.ServeHTTP(w, r)
	}))
	tb.Cleanup(srv.Close)
	f.opts = opts
	f.opts.URL = srv.URL
	return f
}

func (f *countingFront) count(r *http.Request, admin string) {
	u, _, _ := r.BasicAuth()
	seg := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 3)
	db := seg[0]
	switch {
	case strings.HasPrefix(db, UserDBPrefix):
		db = UserDBPrefix + "*"
	case db != "" && db[0] != '_':
		db = "control"
	}
	ep := ""
	if len(seg) > 1 {
		ep = seg[1]
		if ep == "" || ep[0] != '_' || ep == "_design" || ep == "_local" {
			ep = "doc"
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	who := "device"
	if u == admin {
		who = "daemon"
		f.daemon++
	} else {
		f.device++
	}
	f.kinds[fmt.Sprintf("%s %s /%s/%s", who, r.Method, db, ep)]++
}

func (f *countingFront) reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.daemon, f.device, f.kinds = 0, 0, map[string]int{}
}

func (f *countingFront) counts() (daemon, device int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.daemon, f.device
}

func (f *countingFront) table() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	keys := slices.Collect(maps.Keys(f.kinds))
	slices.SortFunc(keys, func(a, b string) int { return f.kinds[b] - f.kinds[a] })
	var sb strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&sb, "%8d %s\n", f.kinds[k], k)
	}
	return sb.String()
}

// getAs reads a document with basic auth.
func getAs(ctx context.Context, hc *http.Client, url, u, pw string) (map[string]any, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.SetBasicAuth(u, pw)
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d", url, resp.StatusCode)
	}
	var doc map[string]any
	return doc, json.NewDecoder(resp.Body).Decode(&doc)
}

// seqSum adds the update sequences of _users, control and every userctl
// database (PouchDB Server's sequences are numbers).
func seqSum(b *testing.B, c *kivik.Client, control string) int {
	b.Helper()
	ctx := context.Background()
	dbs, err := c.AllDBs(ctx)
	if err != nil {
		b.Fatal(err)
	}
	total := 0
	for _, name := range dbs {
		if name != "_users" && name != control && !strings.HasPrefix(name, UserDBPrefix) {
			continue
		}
		st, err := c.DB(name).Stats(ctx)
		if err != nil {
			continue
		}
		v, _ := strconv.Atoi(strings.SplitN(st.UpdateSeq, "-", 2)[0])
		total += v
	}
	return total
}

// rawPutRate is the server's rate of new-document PUTs at c writers.
func rawPutRate(b *testing.B, db *kivik.DB, n, c int) float64 {
	b.Helper()
	work := make(chan int, n)
	for i := range n {
		work <- i
	}
	close(work)
	began := time.Now()
	var wg sync.WaitGroup
	for range c {
		wg.Go(func() {
			for i := range work {
				if _, err := db.Put(context.Background(), fmt.Sprintf("raw-%06d", i), map[string]any{"i": i}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return float64(n) / time.Since(began).Seconds()
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}
