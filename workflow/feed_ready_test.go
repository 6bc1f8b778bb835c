package workflow_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// readyWithin waits for eng.Ready() to be nil and returns how long it took.
func readyWithin(t *testing.T, eng *workflowtest.Running, d time.Duration, what string) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for time.Since(start) < d {
		if err = eng.Ready(); err == nil {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not ready within %v: %v (stats %+v)", what, d, err, eng.Stats())
	return 0
}

// An idle engine on a quiet database is ready a round trip after its start,
// whatever the longpoll timeout (PouchDB Server never answers a longpoll at
// the head of a quiet database, CouchDB only after the timeout), and stays
// ready while longpolls end for lack of changes: heartbeats renew contact,
// and such an end is no failure and no reconnect.
func TestQuietDatabaseReadyAtOnceAndStaysReady(t *testing.T) {
	client := couchtest.Client(t)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})

	slow := workflowtest.Options(t)
	slow.FeedTimeout = time.Minute
	eng := workflowtest.Start(t, couchtest.NewDB(t, client), reg, slow)
	took := readyWithin(t, eng, 3*time.Second, "feed_timeout 1m")
	t.Logf("feed_timeout 1m: ready after %v", took.Round(time.Millisecond))

	opts := workflowtest.Options(t)
	opts.FeedTimeout = 2 * time.Second
	opts.FeedHeartbeat = 500 * time.Millisecond
	db := couchtest.NewDB(t, client)
	short := workflowtest.Start(t, db, reg, opts)
	readyWithin(t, short, 3*time.Second, "feed_timeout 2s")
	// Three longpoll timeouts and more than the contact limit without a
	// change (a heartbeat-renewed contact limit is 3 × 500ms + 2s + 500ms).
	for end := time.Now().Add(7 * time.Second); time.Now().Before(end); {
		if err := short.Ready(); err != nil {
			t.Fatalf("idle engine became unready: %v (stats %+v)", err, short.Stats())
		}
		time.Sleep(50 * time.Millisecond)
	}
	s := short.Stats()
	if s.FeedErrors != 0 {
		t.Fatalf("longpolls that ended for lack of changes counted as %d feed errors (reconnects)", s.FeedErrors)
	}
	if s.FeedRequests < 3 {
		t.Fatalf("%d feed requests in 7s with feed_timeout 2s, want at least 3", s.FeedRequests)
	}
	// And the feed still works: a change is handled at once.
	if _, err := db.Put(context.Background(), "j1", map[string]any{"type": "job", "state": "new"}); err != nil {
		t.Fatal(err)
	}
	workflowtest.Eventually(t, 5*time.Second, "change handled", func() (bool, string) {
		return get(t, db, "j1").State == "done", ""
	})
}

// A server that stops answering without closing the connection (a hung
// process, a network partition) is noticed by the missing heartbeats within
// three heartbeats, counted as a reconnect, and readiness comes back, the
// reason cleared, as soon as the server answers again.
func TestSilentServerUnreadyWithinHeartbeatsAndBack(t *testing.T) {
	direct := couchtest.Client(t)
	db := couchtest.NewDB(t, direct)
	proxy := startFreezeProxy(t, couchtest.Options(t).URL)
	popts := couchtest.Options(t)
	popts.URL = proxy.url
	client, err := couch.NewClient(popts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })

	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	opts := workflowtest.Options(t)
	opts.FeedTimeout = 30 * time.Second
	opts.FeedHeartbeat = 300 * time.Millisecond
	eng := workflowtest.Start(t, client.DB(db.Name()), reg, opts)
	readyWithin(t, eng, 3*time.Second, "before the freeze")
	time.Sleep(time.Second) // into the longpoll

	proxy.freeze(true)
	frozen := time.Now()
	var reason error
	workflowtest.Eventually(t, 8*time.Second, "unready while the server is silent", func() (bool, string) {
		reason = eng.Ready()
		return reason != nil, "still ready"
	})
	t.Logf("unready %v after the server fell silent: %v", time.Since(frozen).Round(time.Millisecond), reason)
	if s := eng.Stats(); s.FeedErrors == 0 {
		t.Fatalf("a silent server was not counted as a feed error: %+v", s)
	}

	proxy.freeze(false)
	took := readyWithin(t, eng, 5*time.Second, "after the server answers again")
	t.Logf("ready %v after the server answered again", took.Round(time.Millisecond))
}

// After a server outage readiness comes back quickly and without the old
// reason: a round trip after the first reconnect the server answers (the
// backoff here is 1s → 2s; how many failures the outage brings depends on
// how long the server takes to start, so the cap keeps the bound fixed).
// Longpolls that ended for lack of changes before the outage are no
// failures.
func TestServerRestartReadinessComesBackQuickly(t *testing.T) {
	srv := couchtest.StartServer(t, couchtest.ServerOptions{OnDisk: true})
	db := couchtest.NewDB(t, srv.Client(t))
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "job", State: "new", Mode: workflow.Safe, Handler: oneStep(newCounter(), "done")})
	opts := workflowtest.Options(t)
	opts.FeedTimeout = time.Second
	opts.FeedHeartbeat = 200 * time.Millisecond
	opts.FeedRetryMin = time.Second
	opts.FeedRetryMax = 2 * time.Second
	eng := workflowtest.Start(t, db, reg, opts)
	readyWithin(t, eng, 3*time.Second, "at start")
	time.Sleep(4 * time.Second) // several longpolls end for lack of changes
	if err := eng.Ready(); err != nil {
		t.Fatalf("idle engine unready: %v", err)
	}
	if s := eng.Stats(); s.FeedErrors != 0 {
		t.Fatalf("%d feed errors on an idle engine with a healthy server", s.FeedErrors)
	}

	srv.Kill(t)
	var reason error
	workflowtest.Eventually(t, 5*time.Second, "unready while the server is down", func() (bool, string) {
		reason = eng.Ready()
		return reason != nil, "still ready"
	})
	t.Logf("down: %v", reason)
	time.Sleep(2 * time.Second)
	srv.Start(t)
	// The next reconnect comes within the 2s backoff cap, and is answered
	// at once.
	took := readyWithin(t, eng, 6*time.Second, "after the restart")
	t.Logf("ready %v after the server was back (feed errors %d)", took.Round(time.Millisecond), eng.Stats().FeedErrors)
	if err := eng.Ready(); err != nil {
		t.Fatalf("reason not cleared: %v", err)
	}
}

// An engine on a database that does not exist says so in its readiness.
func TestMissingDatabaseIsTheReadinessReason(t *testing.T) {
	client := couchtest.Client(t)
	name := "docstate-missing-" + fmt.Sprint(time.Now().UnixNano())
	eng := workflowtest.Start(t, client.DB(name), workflow.NewRegistry(), workflowtest.Options(t))
	want := "database " + name + " does not exist"
	workflowtest.Eventually(t, 5*time.Second, "readiness names the missing database", func() (bool, string) {
		err := eng.Ready()
		return err != nil && strings.Contains(err.Error(), want) && errors.Is(err, workflow.ErrNoDatabase), fmt.Sprint(err)
	})
}

// freezeProxy forwards TCP connections to a server and can freeze: while
// frozen nothing passes in either direction and the connections stay open,
// as with a hung server or a network partition; thawed, what was held
// passes on.
type freezeProxy struct {
	url    string
	ln     net.Listener
	target string

	mu     sync.Mutex
	cond   *sync.Cond
	frozen bool
	conns  map[net.Conn]bool
	closed bool
	wg     sync.WaitGroup
}

func startFreezeProxy(t *testing.T, serverURL string) *freezeProxy {
	t.Helper()
	u, err := url.Parse(serverURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{url: "http://" + ln.Addr().String(), ln: ln, target: u.Host, conns: map[net.Conn]bool{}}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *freezeProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		if !p.track(c, s) {
			return
		}
		p.wg.Go(func() { p.pipe(s, c) })
		p.wg.Go(func() { p.pipe(c, s) })
	}
}

func (p *freezeProxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		for _, c := range conns {
			_ = c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = true
	}
	return true
}

// pipe copies src to dst, holding each chunk while the proxy is frozen.
func (p *freezeProxy) pipe(dst, src net.Conn) {
	defer func() { _ = dst.Close(); _ = src.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.frozen && !p.closed {
				p.cond.Wait()
			}
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return
			}
			return
		}
	}
}

func (p *freezeProxy) freeze(on bool) {
	p.mu.Lock()
	p.frozen = on
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *freezeProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
