package handlers

import (
	"log/slog"
	"net/http"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/internal/metrics"
	"github.com/docstate/docstate/workflow"
)

// Env is what handler sets are built from: the loaded configuration and
// the resources made from it.
type Env struct {
	Config config.Config
	Client *kivik.Client
	DB     *kivik.DB
	Logger *slog.Logger
	// Mux is served on http.listen; sets mount their pages on it (the
	// device confirmation link).
	Mux *http.ServeMux
	// PublicMux is served on http.public_listen: pages that devices and
	// their owners reach (the device confirmation page). Nil when off.
	PublicMux *http.ServeMux

	// Metrics is the daemon's Prometheus instrumentation, set by the
	// daemon (nil in commands that serve none).
	Metrics *metrics.Metrics
}

// Builtin returns docstate's built-in handler sets that the configuration
// enables: device registration with devices.enabled, per-user channels
// with channels.enabled.
func Builtin(env Env) ([]Set, error) {
	var sets []Set
	var ch *channelSet
	var userDBHandlers []func(*workflow.Registry) error
	if env.Config.Channels.Enabled {
		c, err := newChannels(env)
		if err != nil {
			return nil, err
		}
		ch = &c
		// Devices paired through their own users ask for channels by
		// replication into their owner's control database, which the
		// device set's followers watch.
		userDBHandlers = append(userDBHandlers, c.RegisterUserDBs)
	}
	if env.Config.Devices.Enabled {
		d, err := newDevices(env, userDBHandlers)
		if err != nil {
			return nil, err
		}
		sets = append(sets, d)
	}
	if ch != nil {
		sets = append(sets, *ch)
	}
	return sets, nil
}
