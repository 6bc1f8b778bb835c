//go:build linux

package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/docstate/docstate/cmd/cli"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couchtest"
)

// openPTY opens a pseudo-terminal pair: what the command writes to tty the
// test reads from master.
func openPTY(t *testing.T) (master, tty *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("pty number: %v", err)
	}
	tty, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open pty: %v", err)
	}
	return master, tty
}

// TestProgressOnlyOnATerminal: replay and status show progress on stderr
// when it is a terminal, and not when it is a pipe or a file, where it
// would only clutter a log.
func TestProgressOnlyOnATerminal(t *testing.T) {
	db := couchtest.NewDB(t, couchtest.Client(t))
	for _, id := range []string{"a", "b"} {
		if _, err := db.Put(context.Background(), id, map[string]any{"type": "job", "state": "new"}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := writeConfig(t, db.Name(), "")
	run := func(stderr io.Writer, args ...string) string {
		t.Helper()
		var out bytes.Buffer
		root := cli.NewRoot(cli.Options{
			Sets:    func(cli.Env) ([]handlers.Set, error) { return []handlers.Set{jobs}, nil },
			Stdout:  &out,
			Stderr:  stderr,
			Environ: []string{},
		})
		root.SetArgs(append(args, "--config", cfg))
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out.String())
		}
		return out.String()
	}

	var pipe bytes.Buffer
	run(&pipe, "replay", "--since", "0", "--dry-run")
	run(&pipe, "status")
	if pipe.Len() != 0 {
		t.Fatalf("progress written to a non-terminal stderr: %q", pipe.String())
	}

	master, tty := openPTY(t)
	defer master.Close()
	var got bytes.Buffer
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(&got, master) }) // ends with EIO once tty is closed
	run(tty, "replay", "--since", "0", "--dry-run")
	run(tty, "status")
	tty.Close()
	wg.Wait()
	if s := got.String(); !strings.Contains(s, "\r2/2 documents") || !strings.Contains(s, "\rread 2 documents") {
		t.Fatalf("no progress on a terminal stderr: %q", s)
	}
}
