package cli_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
)

// daemon is the examples/orders binary running as a subprocess.
type daemon struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	exited chan struct{}
	err    error // Wait's result, set before exited closes
}

// buildOrders builds examples/orders (docstate plus an order new→accepted
// safe handler) into a temporary directory.
func buildOrders(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the daemon: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "orders")
	build := exec.Command(gobin, "build", "-o", bin, "github.com/docstate/docstate/examples/orders")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build examples/orders: %v\n%s", err, out)
	}
	return bin
}

// startDaemon runs bin with the config, in an environment without the
// test's DOCSTATE_* variables (the daemon refuses unknown ones) and without
// a notify socket.
func startDaemon(t *testing.T, bin, config string) *daemon {
	t.Helper()
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "DOCSTATE_") || k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "WATCHDOG_") {
			continue
		}
		env = append(env, kv)
	}
	d := &daemon{stderr: &syncBuffer{}, exited: make(chan struct{})}
	d.cmd = exec.Command(bin, "run", "--config", config)
	d.cmd.Env = env
	d.cmd.Stdout = d.stderr
	d.cmd.Stderr = d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
	})
	return d
}

// stop sends SIGTERM and waits for the exit, at most within.
func (d *daemon) stop(t *testing.T, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.exited:
	case <-time.After(within):
		t.Fatalf("daemon still running %v after SIGTERM; log:\n%s", within, d.stderr.String())
	}
	took := time.Since(start)
	if d.err != nil {
		t.Fatalf("daemon exited with %v after SIGTERM; log:\n%s", d.err, d.stderr.String())
	}
	return took
}

type order struct {
	ID        string   `json:"_id"`
	Rev       string   `json:"_rev"`
	Type      string   `json:"type"`
	State     string   `json:"state"`
	Items     []string `json:"items"`
	ItemCount int      `json:"item_count"`
	Docstate  struct {
		From string `json:"from"`
	} `json:"docstate"`
}

func orders(t *testing.T, db *kivik.DB) []order {
	t.Helper()
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	var all []order
	for rows.Next() {
		var o order
		if err := rows.ScanDoc(&o); err != nil {
			t.Fatal(err)
		}
		if o.Type == "order" {
			all = append(all, o)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return all
}

func countState(all []order, state string) int {
	n := 0
	for _, o := range all {
		if o.State == state {
			n++
		}
	}
	return n
}

func putOrders(ctx context.Context, db *kivik.DB, prefix string, from, to int) error {
	var docs []any
	for i := from; i < to; i++ {
		docs = append(docs, map[string]any{
			"_id": fmt.Sprintf("%s-%05d", prefix, i), "type": "order", "state": "new",
			"items": []string{"apple", fmt.Sprintf("item-%d", i)},
		})
	}
	res, err := db.BulkDocs(ctx, docs)
	if err != nil {
		return err
	}
	for _, r := range res {
		if r.Error != nil {
			return fmt.Errorf("%s: %w", r.ID, r.Error)
		}
	}
	return nil
}

var checkpointLogged = regexp.MustCompile(`msg="engine stopped".* checkpoint="?([^"\s]+)"?`)

// TestSIGTERMDrainsSavesCheckpointAndLosesNothing runs the real binary under
// load, stops it with SIGTERM, and restarts it: the stop is graceful (exit
// 0 within the drain timeout, checkpoint saved), and after the restart every
// order was accepted exactly once.
func TestSIGTERMDrainsSavesCheckpointAndLosesNothing(t *testing.T) {
	t.Parallel()
	bin := buildOrders(t)
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	const initial = 300
	if err := putOrders(ctx, db, "order", 0, initial); err != nil {
		t.Fatal(err)
	}
	const drain = 10 * time.Second
	addr := freeAddr(t)
	config := writeConfig(t, db.Name(), fmt.Sprintf(
		"engine:\n  drain_timeout: %s\n  workers: 4\n  checkpoint_interval: 200ms\nhttp:\n  listen: %s\n", drain, addr))

	first := startDaemon(t, bin, config)

	// Keep the feed busy while the daemon stops: new orders arrive in
	// batches until the first daemon has exited.
	var (
		added   atomic.Int64
		writers sync.WaitGroup
		werr    error
	)
	stopWriting := make(chan struct{})
	writers.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stopWriting:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if err := putOrders(ctx, db, "late", i*10, i*10+10); err != nil {
				werr = err
				return
			}
			added.Add(10)
		}
	})

	// The binary's /metrics: transitions move while orders flow.
	series := `docstate_transitions_total{engine="docstate"}`
	var early float64 = -1
	for deadline := time.Now().Add(30 * time.Second); early < 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s on the binary's /metrics; log:\n%s", series, first.stderr.String())
		}
		early = scrape(addr, series)
	}

	deadline := time.Now().Add(60 * time.Second)
	var acceptedAtStop int
	for {
		acceptedAtStop = countState(orders(t, db), "accepted")
		if acceptedAtStop >= 50 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d orders accepted after 60s; log:\n%s", acceptedAtStop, first.stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if late := scrape(addr, series); late < 50 || late <= early {
		t.Fatalf("%s went from %v to %v with %d orders accepted", series, early, late, acceptedAtStop)
	}
	took := first.stop(t, drain+5*time.Second)
	close(stopWriting)
	writers.Wait()
	if werr != nil {
		t.Fatal(werr)
	}
	log := first.stderr.String()
	for _, want := range []string{"engine draining", "engine stopped", "docstate stopped"} {
		if !strings.Contains(log, want) {
			t.Errorf("log of the stopped daemon lacks %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, "drain timeout") {
		t.Errorf("the drain ran out of time:\n%s", log)
	}
	draining := regexp.MustCompile(`msg="engine draining".*`).FindString(log)
	t.Logf("SIGTERM with %d orders accepted (of %d + %d written so far): exit 0 after %v; %s",
		acceptedAtStop, initial, added.Load(), took.Round(time.Millisecond), draining)

	// The final checkpoint is saved and is the one the engine logged.
	m := checkpointLogged.FindStringSubmatch(log)
	if m == nil {
		t.Fatalf("no checkpoint in the stop log:\n%s", log)
	}
	var cp struct {
		Seq string `json:"seq"`
	}
	if err := db.Get(ctx, "_local/docstate-docstate").ScanDoc(&cp); err != nil {
		t.Fatalf("checkpoint _local/docstate-docstate: %v", err)
	}
	if cp.Seq == "" || cp.Seq == "0" || cp.Seq != m[1] {
		t.Fatalf("checkpoint seq %q, logged %q: the final checkpoint was not saved", cp.Seq, m[1])
	}
	if after := orders(t, db); countState(after, "new") == 0 {
		t.Logf("note: no order was left new at the stop; the restart only re-checks")
	}

	// Restart: the replayed tail and the start scan finish the rest.
	second := startDaemon(t, bin, config)
	total := initial + int(added.Load())
	var all []order
	deadline = time.Now().Add(60 * time.Second)
	for {
		all = orders(t, db)
		if len(all) == total && countState(all, "accepted") == total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d orders accepted 60s after the restart; log:\n%s",
				countState(all, "accepted"), total, second.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	second.stop(t, drain+5*time.Second)

	// Each order was moved once: accepted from new, by one write (revision
	// 2: the create and the transition), with the handler's field.
	for _, o := range all {
		if o.State != "accepted" || o.Docstate.From != "new" || o.ItemCount != len(o.Items) || !strings.HasPrefix(o.Rev, "2-") {
			t.Errorf("order %s: state %q from %q item_count %d rev %s; want accepted from new, %d items, rev 2-",
				o.ID, o.State, o.Docstate.From, o.ItemCount, o.Rev, len(o.Items))
		}
	}
	if t.Failed() {
		t.Logf("first log:\n%s\nsecond log:\n%s", log, second.stderr.String())
	}
}

// TestSIGHUPReloadsWithADrain sends the real binary SIGHUP: the daemon
// drains, starts again in the same process with the configuration read
// again (here a new http.listen), and goes on handling documents; a SIGHUP
// with a configuration that does not load is logged and changes nothing;
// SIGTERM still stops it with exit 0. Before, SIGHUP killed it undrained.
func TestSIGHUPReloadsWithADrain(t *testing.T) {
	t.Parallel()
	bin := buildOrders(t)
	db := couchtest.NewDB(t, couchtest.Client(t))
	ctx := context.Background()
	first, second := freeAddr(t), freeAddr(t)
	config := writeConfig(t, db.Name(), "engine:\n  drain_timeout: 10s\nhttp:\n  listen: "+first+"\n")
	orig, err := os.ReadFile(config)
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, config)

	// accepted waits until order id was handled by the running daemon.
	accepted := func(id string) {
		t.Helper()
		if _, err := db.Put(ctx, id, map[string]any{"type": "order", "state": "new", "items": []string{"x"}}); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			var o order
			if err := db.Get(ctx, id).ScanDoc(&o); err == nil && o.State == "accepted" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("order %s not accepted within 30s; log:\n%s", id, d.stderr.String())
			}
		}
	}
	healthy := func(addr string) bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	hup := func() {
		t.Helper()
		if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	accepted("before")
	if !healthy(first) {
		t.Fatalf("no /healthz on %s; log:\n%s", first, d.stderr.String())
	}

	if err := os.WriteFile(config, []byte(strings.Replace(string(orig), first, second, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	hup()
	for deadline := time.Now().Add(30 * time.Second); !healthy(second); time.Sleep(50 * time.Millisecond) {
		select {
		case <-d.exited:
			t.Fatalf("the daemon exited on SIGHUP (%v); log:\n%s", d.err, d.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no /healthz on the reloaded http.listen %s within 30s; log:\n%s", second, d.stderr.String())
		}
	}
	if healthy(first) {
		t.Fatalf("the old listener %s still answers after the reload", first)
	}
	log := d.stderr.String()
	for _, want := range []string{"reload requested (SIGHUP); draining", "engine stopped", "starting again with the reloaded configuration"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	if n := strings.Count(log, "docstate starting"); n != 2 {
		t.Errorf("%d starts logged, want 2:\n%s", n, log)
	}
	accepted("after-reload")

	if err := os.WriteFile(config, append([]byte(strings.Replace(string(orig), first, second, 1)), "engine:\n  wrokers: 3\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	hup()
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(d.stderr.String(), "running on unchanged"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a SIGHUP with a broken configuration was not logged; log:\n%s", d.stderr.String())
		}
	}
	if !healthy(second) {
		t.Fatalf("the daemon stopped serving after a SIGHUP with a broken configuration; log:\n%s", d.stderr.String())
	}
	accepted("after-bad-reload")
	d.stop(t, 20*time.Second)
	if n := strings.Count(d.stderr.String(), "docstate starting"); n != 2 {
		t.Errorf("%d starts logged, want 2 (the broken configuration must not restart it):\n%s", n, d.stderr.String())
	}
}
