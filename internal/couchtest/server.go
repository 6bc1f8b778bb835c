package couchtest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/testproc"
)

const (
	// readyTimeout bounds a start. The server is usually ready in under a
	// second; the margin is for loaded CI machines running packages in
	// parallel under -race.
	readyTimeout = 20 * time.Second
	// restartWindow is how long Start retries when the process exits at
	// once, typically because the port of the killed process is not free yet.
	restartWindow = 5 * time.Second
	// exitTimeout bounds the wait for a killed process to be reaped.
	exitTimeout = 10 * time.Second
	// freePortAttempts: a port found free can be taken by someone else
	// before the server binds it; another port is tried then.
	freePortAttempts = 3
)

// serverScript is the PouchDB Server entry point, relative to the repo root.
const serverScript = "teststack/node_modules/pouchdb-server/bin/pouchdb-server"

var (
	errNotInstalled = errors.New("PouchDB Server is not installed")
	errExited       = errors.New("PouchDB Server exited during startup")
)

// ServerOptions configure a dedicated server started by StartServer.
type ServerOptions struct {
	// OnDisk keeps the data in a directory under tb.TempDir(), so it
	// survives Kill. Otherwise the server keeps everything in memory.
	OnDisk bool
	// Port to listen on, on 127.0.0.1. 0 picks a free port. The port stays
	// the same across Kill and Start either way.
	Port int
}

// Server is a dedicated PouchDB Server process, for tests that kill or
// restart the server. Its admin password and port stay the same across
// Kill and Start, so clients built before a restart keep working after it.
type Server struct {
	dir      string // config.json, log.txt, stdout/stderr logs
	dataDir  string // "" keeps the data in memory
	password string
	port     int
	anyPort  bool // port was chosen here and may be changed until first start

	mu   sync.Mutex // guards proc; held across Kill and Start
	proc *process   // nil before the first start
}

type process struct {
	cmd    *exec.Cmd
	done   chan struct{} // closed when Wait returned
	err    error         // Wait's result; read only after done is closed
	killed bool          // stopped by us, not crashed; guarded by Server.mu
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// StartServer starts a PouchDB Server process of its own for this test,
// with an admin user, and waits until it is ready. The process is killed
// when the test ends.
func StartServer(tb testing.TB, opts ServerOptions) *Server {
	tb.Helper()
	// TempDir first: cleanups run last-in first-out, so the process is dead
	// before its directory is removed.
	s, err := newServer(tb.TempDir(), opts)
	if err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
	tb.Cleanup(func() {
		if crash := s.unexpectedExit(); crash != "" {
			tb.Logf("couchtest: PouchDB Server exited unexpectedly during the test: %s", crash)
		}
		if err := s.stop(); err != nil {
			tb.Errorf("couchtest: %v", err)
		}
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.startLocked(); err != nil {
		tb.Fatal(startErrorMessage(err))
	}
	return s
}

func newServer(dir string, opts ServerOptions) (*Server, error) {
	password, err := randomHex(18)
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, password: password, port: opts.Port, anyPort: opts.Port == 0}
	if opts.OnDisk {
		s.dataDir = filepath.Join(dir, "data")
		if err := os.MkdirAll(s.dataDir, 0o700); err != nil {
			return nil, fmt.Errorf("data dir: %w", err)
		}
	}
	return s, nil
}

// URL is the server root, without credentials.
func (s *Server) URL() string {
	return "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// Options returns admin options for this server.
func (s *Server) Options() couch.Options {
	return couch.Options{URL: s.URL(), Username: adminUser, Password: s.password}
}

// Client returns an admin client for this server, closed when the test ends.
func (s *Server) Client(tb testing.TB) *kivik.Client {
	tb.Helper()
	return newClient(tb, s.Options())
}

// Kill sends SIGKILL to the server (and any children) and waits until it has
// exited: a crash, not a shutdown. In-memory data is lost; on-disk data
// stays for Start.
func (s *Server) Kill(tb testing.TB) {
	tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		tb.Fatal("couchtest: Kill: server was never started")
	}
	if err := s.killLocked(); err != nil {
		tb.Fatalf("couchtest: %v", err)
	}
}

// Start starts the server again after Kill, on the same port with the same
// data directory and admin password, and waits until it is ready.
func (s *Server) Start(tb testing.TB) {
	tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil && !s.proc.exited() {
		tb.Fatal("couchtest: Start: server is already running; Kill it first")
	}
	if err := s.startLocked(); err != nil {
		tb.Fatal(startErrorMessage(err))
	}
}

// startFresh is startLocked for Main, which has no testing.TB.
func (s *Server) startFresh() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.startLocked()
}

// startLocked launches the server, retrying when the process exits during
// startup: on a new free port before the first successful start, on the
// same port for a short while after that (or when the port was given).
func (s *Server) startLocked() error {
	if s.anyPort {
		var err error
		for range freePortAttempts {
			if s.port, err = freePort(); err != nil {
				return err
			}
			if err = s.launchLocked(); err == nil {
				// From now on clients rely on this URL.
				s.anyPort = false
				return nil
			}
			if !errors.Is(err, errExited) {
				return err
			}
		}
		return err
	}
	deadline := time.Now().Add(restartWindow)
	for {
		err := s.launchLocked()
		if err == nil || !errors.Is(err, errExited) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// serverConfig is PouchDB Server's config.json. Written fresh before every
// start because the server replaces the password with its hash.
type serverConfig struct {
	Log struct {
		File  string `json:"file"`
		Level string `json:"level"`
	} `json:"log"`
	// Admins must never be empty: without an admin PouchDB Server runs as
	// "admin party" and grants everyone everything.
	Admins map[string]string `json:"admins"`
}

func (s *Server) launchLocked() error {
	node, script, err := locate()
	if err != nil {
		return err
	}
	var cfg serverConfig
	cfg.Log.File = filepath.Join(s.dir, "log.txt")
	cfg.Log.Level = "warning"
	cfg.Admins = map[string]string{adminUser: s.password}
	raw, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	cfgPath := filepath.Join(s.dir, "config.json")
	if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
		return fmt.Errorf("config: %w", err)
	}

	args := []string{script}
	if s.dataDir != "" {
		args = append(args, "--dir", s.dataDir)
	} else {
		args = append(args, "--in-memory")
	}
	args = append(args, "--port", strconv.Itoa(s.port), "--host", "127.0.0.1",
		"--config", cfgPath, "--no-stdout-logs")

	// Output goes to files, not pipes: nothing has to drain them, and they
	// are still there to quote when the server fails. Appending keeps the
	// history of earlier starts.
	stdout, err := openLog(filepath.Join(s.dir, "stdout.log"))
	if err != nil {
		return err
	}
	defer stdout.Close()
	stderr, err := openLog(filepath.Join(s.dir, "stderr.log"))
	if err != nil {
		return err
	}
	defer stderr.Close()
	fmt.Fprintf(stderr, "--- couchtest: start on port %d at %s\n", s.port, time.Now().Format(time.RFC3339Nano))

	cmd := exec.Command(node, args...)
	// The server resolves some paths against its working directory; keep
	// anything it writes out of the source tree.
	cmd.Dir = s.dir
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = testproc.SysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", node, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	// Always Wait, so the process is reaped and never left a zombie.
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	s.proc = p

	if err := s.waitReady(p); err != nil {
		_ = s.killLocked()
		return fmt.Errorf("%w\n%s", err, s.logTail())
	}
	return nil
}

// waitReady polls the server until it answers as this server: GET / must
// come from PouchDB Server and GET /_session must show our admin. The second
// check proves the port is ours; another process could have taken it.
func (s *Server) waitReady(p *process) error {
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(readyTimeout)
	var lastErr error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("%w on port %d: %v", errExited, s.port, p.err)
		default:
		}
		if lastErr = s.checkReady(client); lastErr == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("PouchDB Server on port %d not ready after %s: %w", s.port, readyTimeout, lastErr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Server) checkReady(client *http.Client) error {
	body, err := get(client, s.URL()+"/", "", "")
	if err != nil {
		return err
	}
	if !bytes.Contains(body, []byte(`"express-pouchdb"`)) {
		return fmt.Errorf("GET / answered by something other than PouchDB Server: %.200s", body)
	}
	body, err = get(client, s.URL()+"/_session", adminUser, s.password)
	if err != nil {
		return err
	}
	var session struct {
		UserCtx struct {
			Name  string   `json:"name"`
			Roles []string `json:"roles"`
		} `json:"userCtx"`
	}
	if err := json.Unmarshal(body, &session); err != nil {
		return fmt.Errorf("GET /_session: %w", err)
	}
	if session.UserCtx.Name != adminUser || !slices.Contains(session.UserCtx.Roles, "_admin") {
		return fmt.Errorf("GET /_session: not logged in as admin: %s", body)
	}
	return nil
}

func get(client *http.Client, url, user, password string) ([]byte, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if user != "" {
		req.SetBasicAuth(user, password)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %.200s", url, resp.Status, body)
	}
	return body, nil
}

// killLocked SIGKILLs the process group and waits until the process has been
// reaped. It does nothing if the process already exited.
func (s *Server) killLocked() error {
	p := s.proc
	if p == nil {
		return nil
	}
	p.killed = true
	if p.exited() {
		return nil
	}
	testproc.KillGroup(p.cmd)
	select {
	case <-p.done:
		return nil
	case <-time.After(exitTimeout):
		return fmt.Errorf("PouchDB Server (pid %d) still running %s after SIGKILL", p.cmd.Process.Pid, exitTimeout)
	}
}

func (s *Server) stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.killLocked()
}

// unexpectedExit describes a server that exited without being killed by
// us, or returns "" if it runs or was stopped on purpose.
func (s *Server) unexpectedExit() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.proc
	if p == nil || p.killed || !p.exited() {
		return ""
	}
	return fmt.Sprintf("%v\n%s", p.err, s.logTail())
}

// logTail quotes the end of the server's log files for failure messages.
func (s *Server) logTail() string {
	var b strings.Builder
	for _, name := range []string{"stderr.log", "stdout.log", "log.txt"} {
		path := filepath.Join(s.dir, name)
		tail, err := readTail(path, 2000)
		if err != nil || len(bytes.TrimSpace(tail)) == 0 {
			continue
		}
		fmt.Fprintf(&b, "--- end of %s:\n%s\n", path, bytes.TrimRight(tail, "\n"))
	}
	if b.Len() == 0 {
		return "(the server wrote no logs)"
	}
	return b.String()
}

func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if off := info.Size() - n; off > 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			return nil, err
		}
	}
	return io.ReadAll(f)
}

func openLog(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("server log: %w", err)
	}
	return f, nil
}

// locate finds node and the PouchDB Server script in the repo's teststack.
func locate() (node, script string, err error) {
	root, err := repoRoot()
	if err != nil {
		return "", "", err
	}
	script = filepath.Join(root, filepath.FromSlash(serverScript))
	if _, err := os.Stat(script); err != nil {
		return "", "", fmt.Errorf("%w: %s: %w", errNotInstalled, script, err)
	}
	node, err = exec.LookPath("node")
	if err != nil {
		return "", "", fmt.Errorf("node (Node.js) not found in PATH; install it (Debian: apt-get install nodejs npm): %w", err)
	}
	return node, script, nil
}

// repoRoot walks up from the working directory (a package directory under
// go test) to the directory holding go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find repo root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find repo root: no go.mod above the working directory")
		}
		dir = parent
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}
