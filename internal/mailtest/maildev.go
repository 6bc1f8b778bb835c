package mailtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/testproc"
)

// maildevScript is maildev's entry point relative to the repository root.
const maildevScript = "teststack/node_modules/maildev/dist/bin/maildev.js"

const (
	maildevReadyTimeout = 20 * time.Second
	maildevExitTimeout  = 10 * time.Second
)

// MaildevOptions configure a maildev process.
type MaildevOptions struct {
	// User and Password turn on SMTP AUTH (PLAIN/LOGIN): unauthenticated
	// clients are refused. Both empty = no AUTH.
	User, Password string
}

// Maildev is a maildev process listening on loopback.
type Maildev struct {
	smtpPort, webPort int
	opts              MaildevOptions
	cmd               *exec.Cmd
	done              chan struct{} // closed when the process was reaped
}

// Email is a message as maildev's REST API returns it (the fields tests use).
type Email struct {
	ID        string         `json:"id"`
	MessageID string         `json:"messageId"`
	Subject   string         `json:"subject"`
	Text      string         `json:"text"`
	HTML      string         `json:"html"`
	Headers   map[string]any `json:"headers"`
	From      []Address      `json:"from"`
	To        []Address      `json:"to"`
	Envelope  map[string]any `json:"envelope"`
}

// Header returns the first value of a header (name in any case), or "".
func (e Email) Header(name string) string {
	v, ok := e.Headers[strings.ToLower(name)]
	if !ok {
		return ""
	}
	switch v := v.(type) {
	case string:
		return v
	case []any:
		if len(v) > 0 {
			s, _ := v[0].(string)
			return s
		}
	}
	return fmt.Sprint(v)
}

// Address is a mailbox in an Email.
type Address struct {
	Address string `json:"address"`
	Name    string `json:"name"`
}

// StartMaildev starts maildev with SMTP and web API on free loopback ports,
// waits until its API answers, and kills it when the test ends.
func StartMaildev(tb testing.TB, opts MaildevOptions) *Maildev {
	tb.Helper()
	script, err := findScript(maildevScript)
	if err != nil {
		tb.Fatalf("mailtest: %v; run scripts/teststack install", err)
	}
	smtpPort, err := freePort()
	if err != nil {
		tb.Fatalf("mailtest: %v", err)
	}
	webPort, err := freePort()
	if err != nil {
		tb.Fatalf("mailtest: %v", err)
	}
	dir := tb.TempDir()
	args := []string{script,
		"--smtp", strconv.Itoa(smtpPort), "--ip", "127.0.0.1",
		"--web", strconv.Itoa(webPort), "--web-ip", "127.0.0.1",
		"--silent", "--mail-directory", filepath.Join(dir, "mail"),
	}
	if opts.User != "" || opts.Password != "" {
		args = append(args, "--incoming-user", opts.User, "--incoming-pass", opts.Password)
	}
	// No context: the process lives until Cleanup kills its group.
	cmd := exec.Command("node", args...) //nolint:noctx
	logFile, err := os.Create(filepath.Join(dir, "maildev.log"))
	if err != nil {
		tb.Fatalf("mailtest: %v", err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = testproc.SysProcAttr()
	if err := cmd.Start(); err != nil {
		_ = logFile.Close()
		tb.Fatalf("mailtest: start maildev: %v", err)
	}
	m := &Maildev{smtpPort: smtpPort, webPort: webPort, opts: opts, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		_ = logFile.Close()
		close(m.done)
	}()
	tb.Cleanup(func() {
		testproc.KillGroup(cmd)
		select {
		case <-m.done:
		case <-time.After(maildevExitTimeout):
			tb.Errorf("mailtest: maildev (pid %d) did not exit after SIGKILL", cmd.Process.Pid)
		}
	})
	if err := m.waitReady(tb.Context()); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "maildev.log"))
		tb.Fatalf("mailtest: maildev not ready: %v\n%s", err, log)
	}
	return m
}

func (m *Maildev) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, maildevReadyTimeout)
	defer cancel()
	for {
		select {
		case <-m.done:
			return errors.New("maildev exited during startup")
		default:
		}
		_, err := m.Emails(ctx)
		if err == nil {
			// The web API is up; the SMTP listener starts first in
			// maildev, but check it too rather than rely on that.
			var d net.Dialer
			conn, derr := d.DialContext(ctx, "tcp", m.SMTPAddr())
			if derr == nil {
				_ = conn.Close()
				return nil
			}
			err = derr
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Host is the SMTP host, 127.0.0.1.
func (m *Maildev) Host() string { return "127.0.0.1" }

// SMTPPort is the SMTP port.
func (m *Maildev) SMTPPort() int { return m.smtpPort }

// SMTPAddr is the SMTP host:port.
func (m *Maildev) SMTPAddr() string { return net.JoinHostPort(m.Host(), strconv.Itoa(m.smtpPort)) }

// APIURL is the base URL of the web API.
func (m *Maildev) APIURL() string {
	return "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(m.webPort))
}

// Emails lists every message maildev received.
func (m *Maildev) Emails(ctx context.Context) ([]Email, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.APIURL()+"/api/email", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /api/email: %s", resp.Status)
	}
	var out []Email
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("decode /api/email: %w", err)
	}
	return out, nil
}

// WaitEmails polls until at least n messages arrived or timeout passes, and
// returns what arrived.
func (m *Maildev) WaitEmails(tb testing.TB, n int, timeout time.Duration) []Email {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(tb.Context(), 5*time.Second)
		got, err := m.Emails(ctx)
		cancel()
		if err != nil {
			tb.Fatalf("mailtest: %v", err)
		}
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// findScript looks for rel in the current directory and its parents, so
// tests in any package find the repository's teststack.
func findScript(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(dir, rel)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("%s not found in any parent directory", rel)
		}
		dir = parent
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
