package devicetest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Device is one running device process.
type Device struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser

	mu      sync.Mutex
	nextID  int
	waiting map[int]chan answer
	gone    error // set once the process's output ended
	done    chan struct{}
	reader  sync.WaitGroup
}

type answer struct {
	ID     *int            `json:"id"`
	OK     bool            `json:"ok"`
	Result json.RawMessage `json:"result"`
	Error  string          `json:"error"`
	Status int             `json:"status"`
}

// Error is an operation the device reported as failed.
type Error struct {
	Op     string
	Status int
	Msg    string
}

func (e *Error) Error() string { return fmt.Sprintf("device %s: %d %s", e.Op, e.Status, e.Msg) }

// IsNotFound reports whether err is a device's 404.
func IsNotFound(err error) bool {
	var de *Error
	return errors.As(err, &de) && de.Status == 404
}

// Start runs a device with a fresh data directory. It is stopped, and its
// process waited for, when the test ends.
func Start(tb testing.TB) *Device {
	tb.Helper()
	d, err := start(tb.TempDir())
	if err != nil {
		tb.Fatalf("devicetest: %v", err)
	}
	tb.Cleanup(func() {
		if err := d.Close(); err != nil {
			tb.Errorf("devicetest: %v", err)
		}
	})
	return d
}

func start(dataDir string) (*Device, error) {
	script, err := locate()
	if err != nil {
		return nil, err
	}
	node, err := exec.LookPath("node")
	if err != nil {
		return nil, fmt.Errorf("node (Node.js) not found in PATH: %w", err)
	}
	cmd := exec.Command(node, script, dataDir)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("device stdin: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("device stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start device: %w", err)
	}
	d := &Device{cmd: cmd, stdin: stdin, waiting: map[int]chan answer{}, done: make(chan struct{})}
	d.reader.Go(func() { d.read(stdout) })
	return d, nil
}

// read delivers answers to their callers until the process's output ends.
func (d *Device) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		var a answer
		if err := json.Unmarshal(sc.Bytes(), &a); err != nil || a.ID == nil {
			fmt.Fprintf(os.Stderr, "devicetest: unexpected output line %q\n", sc.Text())
			continue
		}
		d.mu.Lock()
		ch := d.waiting[*a.ID]
		delete(d.waiting, *a.ID)
		d.mu.Unlock()
		if ch != nil {
			ch <- a
		}
	}
	err := sc.Err()
	if err == nil {
		err = errors.New("device process ended")
	}
	d.mu.Lock()
	d.gone = err
	d.mu.Unlock()
	close(d.done)
}

// Do sends one operation with its arguments and decodes the result into out
// (unless nil). A device's failure is an *Error.
func (d *Device) Do(ctx context.Context, op string, args map[string]any, out any) error {
	req := map[string]any{}
	for k, v := range args {
		req[k] = v
	}
	ch := make(chan answer, 1)
	d.mu.Lock()
	if d.gone != nil {
		d.mu.Unlock()
		return fmt.Errorf("device %s: %w", op, d.gone)
	}
	d.nextID++
	id := d.nextID
	d.waiting[id] = ch
	req["id"], req["op"] = id, op
	line, err := json.Marshal(req)
	if err == nil {
		_, err = d.stdin.Write(append(line, '\n'))
	}
	d.mu.Unlock()
	if err != nil {
		d.forget(id)
		return fmt.Errorf("device %s: send: %w", op, err)
	}
	select {
	case a := <-ch:
		if !a.OK {
			return &Error{Op: op, Status: a.Status, Msg: a.Error}
		}
		if out != nil {
			if err := json.Unmarshal(a.Result, out); err != nil {
				return fmt.Errorf("device %s: decode %s: %w", op, a.Result, err)
			}
		}
		return nil
	case <-d.done:
		return fmt.Errorf("device %s: %w", op, d.gone)
	case <-ctx.Done():
		d.forget(id)
		return fmt.Errorf("device %s: %w", op, ctx.Err())
	}
}

func (d *Device) forget(id int) {
	d.mu.Lock()
	delete(d.waiting, id)
	d.mu.Unlock()
}

// Put writes doc to the local database db and returns its new revision.
func (d *Device) Put(ctx context.Context, db string, doc map[string]any) (string, error) {
	var res struct {
		Rev string `json:"rev"`
	}
	err := d.Do(ctx, "put", map[string]any{"db": db, "doc": doc}, &res)
	return res.Rev, err
}

// Get reads a local document (with _conflicts, if any).
func (d *Device) Get(ctx context.Context, db, id string) (map[string]any, error) {
	var doc map[string]any
	err := d.Do(ctx, "get", map[string]any{"db": db, "docid": id}, &doc)
	return doc, err
}

// Remote names a server database and the credentials the device uses for it
// (empty User: anonymous).
type Remote struct {
	URL, User, Password string
}

func (r Remote) args(db, direction string, live bool) map[string]any {
	return map[string]any{"db": db, "url": r.URL, "user": r.User, "password": r.Password, "direction": direction, "live": live}
}

// Replicate runs one replication of the local database db with r to its
// end: direction is "push", "pull" or "sync".
func (d *Device) Replicate(ctx context.Context, db string, r Remote, direction string) error {
	return d.Do(ctx, "replicate", r.args(db, direction, false), nil)
}

// Live starts a continuous replication that retries through outages and
// returns its handle.
func (d *Device) Live(ctx context.Context, db string, r Remote, direction string) (int, error) {
	var res struct {
		Handle int `json:"handle"`
	}
	err := d.Do(ctx, "replicate", r.args(db, direction, true), &res)
	return res.Handle, err
}

// LiveStatus is a live replication's last state.
type LiveStatus struct {
	State       string `json:"state"`
	Error       string `json:"error"`
	DocsWritten int    `json:"docs_written"`
	DocsRead    int    `json:"docs_read"`
}

// Status reports a live replication's state.
func (d *Device) Status(ctx context.Context, handle int) (LiveStatus, error) {
	var st LiveStatus
	err := d.Do(ctx, "status", map[string]any{"handle": handle}, &st)
	return st, err
}

// Offline cuts every connection of the device; Online restores them.
func (d *Device) Offline(ctx context.Context) error { return d.Do(ctx, "offline", nil, nil) }

// Online restores the device's connections.
func (d *Device) Online(ctx context.Context) error { return d.Do(ctx, "online", nil, nil) }

// WaitFor waits until the local document id has every field in fields, and
// returns it.
func (d *Device) WaitFor(ctx context.Context, db, id string, fields map[string]any, timeout time.Duration) (map[string]any, error) {
	var doc map[string]any
	err := d.Do(ctx, "wait_for", map[string]any{"db": db, "docid": id, "fields": fields, "timeout_ms": timeout.Milliseconds()}, &doc)
	return doc, err
}

// Response is a raw HTTP answer.
type Response struct {
	Status int             `json:"status"`
	Body   json.RawMessage `json:"body"`
}

// HTTP sends one raw request from the device (body is sent as JSON unless
// it is a string); user "" sends no credentials.
func (d *Device) HTTP(ctx context.Context, method, url, user, password string, body any) (Response, error) {
	args := map[string]any{"method": method, "url": url, "user": user, "password": password}
	if body != nil {
		args["body"] = body
	}
	var res Response
	err := d.Do(ctx, "http", args, &res)
	return res, err
}

// SignUp creates the device's own CouchDB user, as CouchDB lets anyone do:
// a _users document with no roles. extra fields go on the document.
func (d *Device) SignUp(ctx context.Context, server, name, password string, extra map[string]any) (Response, error) {
	doc := map[string]any{"_id": "org.couchdb.user:" + name, "name": name, "password": password, "roles": []string{}, "type": "user"}
	for k, v := range extra {
		doc[k] = v
	}
	return d.HTTP(ctx, "PUT", server+"/_users/org.couchdb.user:"+name, "", "", doc)
}

// Close ends the device: its input closes, it cancels its replications and
// exits; it is killed if it has not within 10s.
func (d *Device) Close() error {
	d.mu.Lock()
	err := d.stdin.Close()
	d.mu.Unlock()
	if err != nil && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("close device input: %w", err)
	}
	exited := make(chan error, 1)
	go func() { d.reader.Wait(); exited <- d.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			return fmt.Errorf("device exited: %w", err)
		}
		return nil
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-exited
		return errors.New("device did not exit within 10s of its input closing; killed")
	}
}

// locate finds teststack/device.js above the working directory.
func locate() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find repo root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			script := filepath.Join(dir, "teststack", "device.js")
			if _, err := os.Stat(filepath.Join(dir, "teststack", "node_modules", "pouchdb")); err != nil {
				return "", fmt.Errorf("the PouchDB client is not installed; run scripts/teststack install: %w", err)
			}
			return script, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find repo root: no go.mod above the working directory")
		}
		dir = parent
	}
}
