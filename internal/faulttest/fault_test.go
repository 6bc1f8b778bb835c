package faulttest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/internal/mailtest"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// The workload: a wave of documents arrives before each daemon start, so
// every kill lands on work in progress.
const (
	kills      = 6
	waves      = kills + 1
	safeWave   = 100
	unsafeWave = 40
	deviceWave = 3
	channelWav = 2

	safeJobs   = safeWave * waves
	unsafeJobs = unsafeWave * waves
	deviceDocs = deviceWave * waves
	channelDoc = channelWav * waves
)

// TestKillsServerRestartAndSMTPDropLoseNothingAndDoubleNothing runs the
// daemon binary over a mixed workload (safe jobs, unsafe jobs with a
// durable ledger, device registrations that mail a code, channels), kills
// it with SIGKILL at random points, kills and restarts the on-disk server
// once, drops the SMTP relay once, then lets a last daemon finish. After
// that: every document reached its final state, every unsafe job ran
// under exactly one idempotency key (a run repeated after a kill between
// side effect and record repeats that key: the declared at-least-once with a
// stable key), every device got mail under exactly one Message-ID, no claim
// is left, and the daemon's logs hold no code and no password.
func TestKillsServerRestartAndSMTPDropLoseNothingAndDoubleNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("fault injection runs for about a minute")
	}
	srv := couchtest.StartServer(t, couchtest.ServerOptions{OnDisk: true})
	admin := srv.Client(t)
	ctx := context.Background()
	if err := admin.CreateDB(ctx, "control"); err != nil {
		t.Fatal(err)
	}
	db := admin.DB("control")
	bin := build(t)
	dir := t.TempDir()
	ledger := filepath.Join(dir, "ledger")
	mock := mailtest.StartMock(t, mailtest.MockOptions{})
	mocks := []*mailtest.Mock{mock}
	httpAddr := freeAddr(t)
	config := writeConfig(t, dir, srv, mock.Port(), httpAddr)

	var logs []*bytes.Buffer
	run := func() *daemon {
		d := start(t, bin, config, ledger)
		logs = append(logs, d.log)
		return d
	}
	rng := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for k := 1; k <= kills; k++ {
		seed(t, db, k)
		d := run()
		time.Sleep(time.Duration(300+rng.IntN(1200)) * time.Millisecond)
		switch k {
		case 2: // the server dies under the daemon and comes back
			srv.Kill(t)
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
			srv.Start(t)
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond)
		case 4: // the relay goes away for a while and comes back
			mocks[len(mocks)-1].Stop(t)
			time.Sleep(1500 * time.Millisecond)
			mocks = append(mocks, mailtest.StartMock(t, mailtest.MockOptions{Port: mock.Port()}))
			time.Sleep(time.Duration(200+rng.IntN(600)) * time.Millisecond)
		}
		d.kill(t)
		t.Logf("kill %d: %s", k, progress(t, db))
	}
	seed(t, db, waves)
	last := run()
	// On a failure the daemons' logs go where DOCSTATE_FAULT_LOGS says.
	t.Cleanup(func() {
		if dir := os.Getenv("DOCSTATE_FAULT_LOGS"); dir != "" && t.Failed() {
			for i, l := range logs {
				last.mu.Lock()
				_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("daemon-%d.log", i)), l.Bytes(), 0o600)
				last.mu.Unlock()
			}
		}
	})
	// On a failure, what holds each claim left, and what the daemons said
	// about it, go into the test's own output (CI keeps only that).
	t.Cleanup(func() {
		if t.Failed() {
			last.mu.Lock()
			defer last.mu.Unlock()
			explainClaims(t, db, logs)
		}
	})
	workflowtest.Eventually(t, 180*time.Second, "everything settled", func() (bool, string) {
		st := tally(t, db)
		return st.settled(), progress(t, db)
	})
	metrics := scrape(t, "http://"+httpAddr+"/metrics")
	last.stop(t)
	// A run that began after the check above (a device's confirming run
	// follows its mail) may be cut by the drain timeout under load,
	// leaving its claim: the next start takes it over once its lease ran
	// out. That is the guarantee, so it is what is checked: at most two
	// more starts settle everything with no claim left.
	for extra := 1; tally(t, db).claims != 0; extra++ {
		if extra > 2 {
			t.Fatalf("claims still left after %d more starts: %s", extra-1, progress(t, db))
		}
		t.Logf("claims left after the graceful stop (%s); start %d more", progress(t, db), extra)
		d := run()
		workflowtest.Eventually(t, 60*time.Second, "claims taken over", func() (bool, string) {
			st := tally(t, db)
			return st.settled(), progress(t, db)
		})
		d.stop(t)
	}

	// Check the outcome.
	st := tally(t, db)
	keys := readLedger(t, ledger)
	var duplicates, repeats, lost int
	for id, ks := range keys {
		if len(ks.distinct) > 1 {
			duplicates++
			t.Errorf("%s ran under %d idempotency keys: %v", id, len(ks.distinct), ks.distinct)
		}
		repeats += ks.lines - 1
	}
	for _, j := range st.unsafe {
		if ks := keys[j.id]; ks == nil || j.Key == "" || !ks.distinct[j.Key] {
			lost++
			t.Errorf("unsafe job %s recorded key %q, ledger %v", j.id, j.Key, ks)
		}
	}
	mailIDs := map[string]map[string]bool{} // owner → Message-IDs
	var codes []string
	mails := 0
	for _, m := range mocks {
		for _, msg := range m.Received(t) {
			mails++
			to := strings.Trim(msg.Header.Get("To"), "<>")
			if mailIDs[to] == nil {
				mailIDs[to] = map[string]bool{}
			}
			mailIDs[to][strings.Trim(msg.Header.Get("Message-Id"), "<>")] = true
			body := new(bytes.Buffer)
			_, _ = body.ReadFrom(msg.Body)
			codes = append(codes, regexp.MustCompile(`\b\d{8}\b`).FindAllString(body.String(), -1)...)
		}
	}
	for _, dv := range st.devices {
		ids := mailIDs[dv.Owner]
		if len(ids) != 1 || !ids[dv.MessageID] {
			duplicates++
			t.Errorf("device %s (%s): Message-IDs %v, recorded %q", dv.id, dv.Owner, ids, dv.MessageID)
		}
	}
	if len(codes) == 0 {
		t.Fatal("no code found in the mails")
	}
	// Nothing secret in what the daemons logged, in what they export as
	// metrics (no address either: labels are for types and states), or in
	// any document of any database, the channels' included (they
	// replicate to devices).
	secrets := append(codes, srv.Options().Password)
	for i, l := range logs {
		text := l.String()
		for _, secret := range secrets {
			if strings.Contains(text, secret) {
				t.Errorf("daemon run %d logged a secret (%q…)", i+1, secret[:3])
			}
		}
	}
	if !strings.Contains(metrics, "docstate_") {
		t.Fatalf("no docstate metrics scraped:\n%.500s", metrics)
	}
	for _, secret := range append(secrets, "@example.test") {
		if strings.Contains(metrics, secret) {
			t.Errorf("metrics hold a secret or an address (%q…)", secret[:3])
		}
	}
	scanned := scanDocs(t, admin, secrets)
	t.Logf("docs %d (safe %d, unsafe %d, devices %d, channels %d), daemon kills %d, server restarts 1, SMTP drops 1: "+
		"duplicates %d, lost %d, claims left %d; unsafe re-runs under the same key %d, mails %d for %d devices; "+
		"no code or password in %d log bytes, %d metrics bytes, %d documents",
		st.total(), st.safeDone, len(st.unsafe), len(st.devices), st.channelsReady, kills,
		duplicates, lost, st.claims, repeats, mails, len(mailIDs), logBytes(logs), len(metrics), scanned)
	if duplicates != 0 || lost != 0 || st.claims != 0 {
		t.Fatalf("duplicates %d, lost %d, claims left %d", duplicates, lost, st.claims)
	}
}

// build compiles faultd.
func build(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "faultd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/docstate/docstate/internal/faulttest/faultd").CombinedOutput()
	if err != nil {
		t.Fatalf("go build faultd: %v\n%s", err, out)
	}
	return bin
}

func writeConfig(t *testing.T, dir string, srv *couchtest.Server, smtpPort int, httpAddr string) string {
	t.Helper()
	secret := filepath.Join(dir, "secret")
	var b [32]byte
	_, _ = rand.Read(b[:])
	if err := os.WriteFile(secret, b[:], 0o600); err != nil {
		t.Fatal(err)
	}
	o := srv.Options()
	cfg := fmt.Sprintf(`couchdb:
  url: %s
  username: %s
  password: %s
database: control
engine:
  # Handlers get 4s: on two shared cores under the whole suite, one Mango
  # scan of the control database (a channel's devices) can take over 2s.
  lease: 6s
  # A killed daemon's membership lingers this long: its share waits for it.
  member_lease: 3s
  handler_timeout: 4s
  max_attempts: 20
  retry_base: 200ms
  retry_max: 2s
  resync_interval: 1s
  checkpoint_interval: 200ms
  feed_timeout: 2s
  drain_timeout: 2s
log:
  level: debug
http:
  listen: %s
smtp:
  host: 127.0.0.1
  port: %d
  tls: none
  helo: localhost
  timeout: 5s
  from: docstate@example.test
devices:
  enabled: true
  secret_file: %s
  # The seeded devices write their documents into the control database.
  pairing: control
channels:
  enabled: true
  prefix: fault-
  reconcile_interval: 3s
`, o.URL, o.Username, o.Password, httpAddr, smtpPort, secret)
	path := filepath.Join(dir, "docstate.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// seed writes wave w of the workload.
func seed(t *testing.T, db *kivik.DB, w int) {
	t.Helper()
	var docs []any
	for i := range safeWave {
		docs = append(docs, map[string]any{"_id": fmt.Sprintf("safe-%d-%04d", w, i), "type": "safejob", "state": "new"})
	}
	for i := range unsafeWave {
		docs = append(docs, map[string]any{"_id": fmt.Sprintf("unsafe-%d-%04d", w, i), "type": "unsafejob", "state": "new"})
	}
	for i := range deviceWave {
		docs = append(docs, map[string]any{"_id": fmt.Sprintf("device-%d-%04d", w, i), "type": "device", "state": "new",
			"owner": fmt.Sprintf("user%d-%d@example.test", w, i), "device_name": "phone",
			"credentials": map[string]any{"password_scheme": "pbkdf2", "derived_key": randHex(20), "salt": randHex(16), "iterations": 1000}})
	}
	for i := range channelWav {
		docs = append(docs, map[string]any{"_id": fmt.Sprintf("channel-%d-%04d", w, i), "type": "channel", "state": "new",
			"owner": fmt.Sprintf("user%d-%d@example.test", w, i), "name": fmt.Sprintf("Channel %d", i),
			"members": []string{fmt.Sprintf("user%d-%d@example.test", w, i+1)}})
	}
	res, err := db.BulkDocs(context.Background(), docs)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Error != nil {
			t.Fatalf("%s: %v", r.ID, r.Error)
		}
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// doc is what the checks read of every document.
type doc struct {
	id        string
	Type      string `json:"type"`
	State     string `json:"state"`
	Key       string `json:"key"`
	Owner     string `json:"owner"`
	MessageID string `json:"message_id"`
	Docstate  struct {
		Claim map[string]any `json:"claim"`
	} `json:"docstate"`
}

// explainClaims logs every document still holding a claim, with the last
// lines any daemon logged about it.
func explainClaims(t *testing.T, db *kivik.DB, logs []*bytes.Buffer) {
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	shown := 0
	for rows.Next() && shown < 8 {
		var d struct {
			ID       string          `json:"_id"`
			Rev      string          `json:"_rev"`
			State    string          `json:"state"`
			Docstate json.RawMessage `json:"docstate"`
		}
		if rows.ScanDoc(&d) != nil || !bytes.Contains(d.Docstate, []byte(`"claim":{`)) {
			continue
		}
		shown++
		t.Logf("claim left on %s %s (state %s): %s", d.ID, d.Rev, d.State, d.Docstate)
		var said []string
		for i, l := range logs {
			for _, line := range strings.Split(l.String(), "\n") {
				if strings.Contains(line, `"`+d.ID+`"`) || strings.Contains(line, "="+d.ID+" ") || strings.HasSuffix(line, "="+d.ID) {
					said = append(said, fmt.Sprintf("run %d: %.300s", i+1, line))
				}
			}
		}
		t.Logf("  %d log lines about it; the last ones:\n%s", len(said), strings.Join(said[max(0, len(said)-12):], "\n"))
	}
}

type counts struct {
	safeDone, channelsReady, claims, other int
	unsafe, devices                        []doc
	unsafeDone, devicesMailed              int
}

func (c counts) settled() bool {
	return c.safeDone == safeJobs && c.unsafeDone == unsafeJobs && c.devicesMailed == deviceDocs &&
		c.channelsReady == channelDoc && c.claims == 0
}

func (c counts) total() int { return c.safeDone + len(c.unsafe) + len(c.devices) + c.channelsReady }

func tally(t *testing.T, db *kivik.DB) counts {
	t.Helper()
	var c counts
	rows := db.AllDocs(context.Background(), kivik.Param("include_docs", true))
	defer rows.Close()
	for rows.Next() {
		var d doc
		if err := rows.ScanDoc(&d); err != nil {
			continue
		}
		d.id, _ = rows.ID()
		if d.Docstate.Claim != nil {
			c.claims++
		}
		switch {
		case d.Type == "safejob" && d.State == "done":
			c.safeDone++
		case d.Type == "unsafejob":
			c.unsafe = append(c.unsafe, d)
			if d.State == "done" {
				c.unsafeDone++
			}
		case d.Type == "device":
			c.devices = append(c.devices, d)
			if d.State == "confirming" && d.MessageID != "" {
				c.devicesMailed++
			}
		case d.Type == "channel" && d.State == "ready":
			c.channelsReady++
		}
	}
	if err := rows.Err(); err != nil {
		t.Logf("tally: %v", err)
	}
	return c
}

func progress(t *testing.T, db *kivik.DB) string {
	c := tally(t, db)
	return fmt.Sprintf("safe %d/%d, unsafe %d/%d, devices mailed %d/%d, channels %d/%d, claims held %d",
		c.safeDone, safeJobs, c.unsafeDone, unsafeJobs, c.devicesMailed, deviceDocs, c.channelsReady, channelDoc, c.claims)
}

type ledgerKeys struct {
	distinct map[string]bool
	lines    int
}

func readLedger(t *testing.T, path string) map[string]*ledgerKeys {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]*ledgerKeys{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		id, key, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			t.Fatalf("torn ledger line %q", sc.Text())
		}
		if out[id] == nil {
			out[id] = &ledgerKeys{distinct: map[string]bool{}}
		}
		out[id].distinct[key] = true
		out[id].lines++
	}
	return out
}

// daemon is one faultd process.
type daemon struct {
	cmd  *exec.Cmd
	log  *bytes.Buffer
	mu   *sync.Mutex
	done chan error
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func start(t *testing.T, bin, config, ledger string) *daemon {
	t.Helper()
	var env []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "DOCSTATE_") || k == "NOTIFY_SOCKET" {
			continue
		}
		env = append(env, kv)
	}
	d := &daemon{log: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan error, 1)}
	d.cmd = exec.Command(bin, "run", "--config", config)
	d.cmd.Env = append(env, "FAULTD_LEDGER="+ledger)
	d.cmd.Stdout = lockedWriter{d.mu, d.log}
	d.cmd.Stderr = lockedWriter{d.mu, d.log}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		_ = d.cmd.Process.Kill()
		if (t.Failed() || os.Getenv("FAULT_KEEP_LOGS") != "") && os.Getenv("FAULT_LOG_DIR") != "" {
			// The daemons' logs explain a failure; CI keeps them.
			d.mu.Lock()
			defer d.mu.Unlock()
			path := filepath.Join(os.Getenv("FAULT_LOG_DIR"), fmt.Sprintf("faultd-%d.log", d.cmd.Process.Pid))
			_ = os.WriteFile(path, d.log.Bytes(), 0o644)
		}
	})
	return d
}

func (d *daemon) kill(t *testing.T) {
	t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

func (d *daemon) stop(t *testing.T) {
	t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil {
			d.mu.Lock()
			defer d.mu.Unlock()
			t.Fatalf("daemon exited with %v after SIGTERM; log tail:\n%s", err, tail(d.log.String(), 3000))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop within 30s of SIGTERM")
	}
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}

// freeAddr returns a loopback address with a port free now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// scrape reads the daemon's metrics page.
func scrape(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

// scanDocs reads every document of every user database (the control
// database and every channel's) and reports any that holds a secret. It
// returns how many documents it read.
func scanDocs(t *testing.T, admin *kivik.Client, secrets []string) int {
	t.Helper()
	ctx := context.Background()
	names, err := admin.AllDBs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range names {
		if strings.HasPrefix(name, "_") {
			continue // _users holds the devices' credentials, by design
		}
		rows := admin.DB(name).AllDocs(ctx, kivik.Param("include_docs", true))
		for rows.Next() {
			var raw json.RawMessage
			if err := rows.ScanDoc(&raw); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			n++
			for _, secret := range secrets {
				if strings.Contains(string(raw), secret) {
					id, _ := rows.ID()
					t.Errorf("%s/%s holds a secret (%q…)", name, id, secret[:3])
				}
			}
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_ = rows.Close()
	}
	return n
}

func logBytes(logs []*bytes.Buffer) int {
	n := 0
	for _, l := range logs {
		n += l.Len()
	}
	return n
}
