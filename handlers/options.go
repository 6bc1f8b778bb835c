package handlers

import (
	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/supervisor"
)

// EngineOptions maps the configuration onto the engine's options.
func EngineOptions(cfg config.Config) workflow.Options {
	e := cfg.Engine
	return workflow.Options{
		Name:               e.Name,
		Owner:              e.Owner,
		Workers:            e.Workers,
		BatchSize:          e.BatchSize,
		BatchLinger:        e.BatchLinger,
		HandlerTimeout:     e.HandlerTimeout,
		Lease:              e.Lease,
		MaxAttempts:        e.MaxAttempts,
		RetryBase:          e.RetryBase,
		RetryMax:           e.RetryMax,
		FeedTimeout:        e.FeedTimeout,
		FeedHeartbeat:      e.FeedHeartbeat,
		FeedBatch:          e.FeedBatch,
		FeedLinger:         e.FeedLinger,
		MaxPending:         e.MaxPending,
		MaxDocBytes:        e.MaxDocBytes,
		MaxPendingBytes:    e.MaxPendingBytes,
		CheckpointInterval: e.CheckpointInterval,
		ResyncInterval:     e.ResyncInterval,
		NoStartScan:        !e.FullResyncOnStart,
		DrainTimeout:       e.DrainTimeout,
		Members:            e.Members,
		FeedWithoutBodies:  e.FeedWithoutBodies,
		MemberLease:        e.MemberLease,
	}
}

// SupervisorOptions maps the configuration onto many-database mode's
// options; ok is false in single-database mode.
func SupervisorOptions(cfg config.Config) (supervisor.Options, bool) {
	d := cfg.Databases
	patterns := d.PatternList()
	return supervisor.Options{
		Patterns:          patterns,
		MaxOpen:           d.MaxOpen,
		DiscoveryInterval: d.DiscoveryInterval,
		IdleStop:          d.IdleStop,
		Turn:              d.Turn,
		Shard:             d.Shard,
		Shards:            d.Shards,
		Engine:            EngineOptions(cfg),
	}, len(patterns) > 0
}
