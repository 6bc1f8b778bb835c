package devices

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
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

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
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
// TestDevicePairsThroughItsOwnUserAndRevokesByReplication. Reports
// pairings/s, the server's raw PUT rate at 16 writers in the same run,
// p50/p99 from sign-up to mail and from confirmation to active, the
// daemon's heap per owner, and the documents written per pairing (update
// sequences of _users, the control database and the owners' databases):
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
	raw := rawPutRate(b, couchtest.NewDB(b, couchtest.Client(b)), 2000, 16)
	heapBefore := heapInUse()
	s := startUsersStackWith(b, mock, rec, func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		o.GlobalSends, o.GlobalWindow = n*4, time.Hour
		o.AddressSends = 1000
	})
	ctx := context.Background()
	tag := randomHex(b, 4)
	server := s.server
	user := func(i int) string { return fmt.Sprintf("bp%s-%d", tag, i) }
	owner := func(i int) string { return fmt.Sprintf("bp%s-%d@example.test", tag, i/2) }
	seqBefore := seqSum(b, couchtest.Client(b), s.db.Name())

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
		rows := s.db.AllDocs(ctx, kivik.Params(map[string]any{"include_docs": true, "startkey": trustedPrefix + "bp" + tag, "endkey": trustedPrefix + "bp" + tag + "\ufff0"}))
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
	heapAfter := heapInUse()
	writes := seqSum(b, couchtest.Client(b), s.db.Name()) - seqBefore

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
