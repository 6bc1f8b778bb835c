package handlers

import (
	"fmt"

	"github.com/docstate/docstate/channels"
)

// channelSet is the per-user channels handler set, as the daemon runs it.
type channelSet struct{ *channels.Channels }

var _ Set = channelSet{}

func (channelSet) Name() string { return "channels" }

// newChannels builds the channel set from the configuration.
func newChannels(env Env) (channelSet, error) {
	cfg := env.Config.Channels
	opts := channels.Options{
		Client:            env.Client,
		DB:                env.DB,
		Prefix:            cfg.Prefix,
		PublicURL:         cfg.PublicURL,
		OnDelete:          cfg.OnDelete,
		ReconcileInterval: cfg.ReconcileInterval,
		MaxMembers:        cfg.MaxMembers,
		Logger:            env.Logger,
		// Devices paired through their own users look for their
		// subscriptions in their owner's control database.
		UserDBs: env.Config.Devices.Enabled && env.Config.Devices.Pairing == "users",
	}
	templates, err := cfg.TemplateMap()
	if err != nil {
		return channelSet{}, fmt.Errorf("channels.templates: %w", err)
	}
	if len(templates) > 0 {
		opts.Templates = templates
		// The server replicates into channels as the daemon's own admin.
		opts.Replicator = channels.Replicator{URL: env.Config.CouchDB.URL,
			Username: env.Config.CouchDB.Username, Password: env.Config.CouchDB.Password}
	}
	if env.Metrics != nil {
		opts.OnProvisioned = env.Metrics.ChannelProvisioned
		opts.OnSeed = env.Metrics.ChannelSeed
	}
	c, err := channels.New(opts)
	if err != nil {
		return channelSet{}, err
	}
	return channelSet{c}, nil
}
