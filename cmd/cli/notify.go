package cli

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/docstate/docstate/workflow"
)

// readyPoll is how often run checks whether the engine follows its feed
// before it tells systemd READY=1.
const readyPoll = 200 * time.Millisecond

// notifier tells systemd (sd_notify) how the daemon is doing: READY=1 once
// the engine is in contact with the server and caught up with its feed
// (Engine.Ready, usually a round trip after the start), WATCHDOG=1 every
// watchdog/2 while it stays so (heartbeats keep an idle feed in contact),
// STOPPING=1 when a stop begins. With Type=notify and WatchdogSec
// in the unit, a daemon whose feed is stuck stops pinging and systemd
// restarts it.
//
// A nil *notifier does nothing, so callers need no checks when NOTIFY_SOCKET
// is unset.
type notifier struct {
	// notify sends one sd_notify message (newline-separated assignments).
	notify func(state string) error
	// ready is nil while the engine follows its feed (Engine.Ready).
	ready func() error
	// status describes the daemon for STATUS= (shown by systemctl status).
	status func() string
	// watchdog is the watchdog timeout (WatchdogSec); 0 sends no pings.
	watchdog time.Duration
	// poll is how often readiness is checked before READY=1.
	poll time.Duration
	log  *slog.Logger

	mu      sync.Mutex
	stopped bool // STOPPING=1 was sent: nothing else follows it
}

// systemdNotifier returns the notifier for the engine, or nil when the
// process was not started by systemd with a notify socket.
func systemdNotifier(log *slog.Logger, eng follower, database string) *notifier {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return nil
	}
	wd, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog settings unusable; not pinging", "err", err)
		wd = 0
	}
	return &notifier{
		notify: func(state string) error {
			_, err := daemon.SdNotify(false, state)
			return err
		},
		ready:    eng.Ready,
		status:   func() string { return engineStatus(database, eng.Stats()) },
		watchdog: wd,
		poll:     readyPoll,
		log:      log,
	}
}

// engineStatus is the STATUS= line while the daemon runs. It names only the
// database and counts: no ids, no credentials.
func engineStatus(database string, s workflow.Stats) string {
	return fmt.Sprintf("following %s: %d changes, %d handler runs (%d failed), %d running, %d queued, %d pending",
		database, s.ChangesReceived, s.Runs, s.RunErrors, s.Inflight, s.Queued, s.Pending)
}

// send sends one message and logs a failure; systemd being unreachable
// must not stop the daemon. After STOPPING=1 it sends nothing.
func (n *notifier) send(state string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		return
	}
	n.sendLocked(state)
}

func (n *notifier) sendLocked(state string) {
	if err := n.notify(state); err != nil {
		n.log.Warn("sd_notify failed", "err", err)
		return
	}
	n.log.Debug("sd_notify sent", "state", state)
}

// run announces READY=1 once ready() is nil, then pings the watchdog while
// ready() stays nil, until ctx ends. It returns when ctx ends.
func (n *notifier) run(ctx context.Context) {
	if n == nil {
		return
	}
	n.send("STATUS=starting: waiting for the changes feed")
	if !n.waitReady(ctx) {
		return
	}
	n.send("READY=1\nSTATUS=" + n.status())
	n.log.Info("systemd notified: ready", "watchdog", n.watchdog)
	if n.watchdog <= 0 {
		return
	}
	// systemd arms the watchdog when start-up completes (READY=1); a first
	// ping at once keeps a full interval between any two pings.
	n.send("WATCHDOG=1")
	t := time.NewTicker(n.watchdog / 2)
	defer t.Stop()
	healthy := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := n.ready(); err != nil {
			// No ping: if the feed stays stuck, systemd's watchdog fires
			// and Restart= starts a fresh daemon.
			n.log.Warn("skipping systemd watchdog ping: the changes feed is not healthy", "reason", err.Error())
			n.send("STATUS=feed unhealthy, watchdog not pinged: " + err.Error())
			healthy = false
			continue
		}
		if !healthy {
			n.log.Info("changes feed healthy again; pinging the systemd watchdog")
			healthy = true
		}
		n.send("WATCHDOG=1\nSTATUS=" + n.status())
	}
}

// waitReady polls ready() until it is nil (true) or ctx ends (false).
func (n *notifier) waitReady(ctx context.Context) bool {
	t := time.NewTicker(n.poll)
	defer t.Stop()
	for n.ready() != nil {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	return true
}

// stopping tells systemd the daemon is stopping: it stops expecting
// watchdog pings and waits up to TimeoutStopSec for the drain.
func (n *notifier) stopping() {
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.stopped {
		n.stopped = true
		n.sendLocked("STOPPING=1\nSTATUS=stopping: draining running handlers")
	}
}

// reloading tells systemd the daemon drains to start again with a new
// configuration (SIGHUP); the next run's notifier sends READY=1. Like
// STOPPING=1 it ends this notifier's messages: its engine is going away.
func (n *notifier) reloading() {
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.stopped {
		n.stopped = true
		n.sendLocked("RELOADING=1\nSTATUS=reloading: draining running handlers")
	}
}
