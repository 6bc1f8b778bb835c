// Package supervisor is docstate's many-database mode: it runs a
// workflow.Registry's handlers over every database whose name matches a
// glob, one workflow.Engine per database with work, at most
// Options.MaxOpen at once.
//
// Discovery learns which databases changed from /_db_updates where the
// server has it (Apache CouchDB), otherwise by listing _all_dbs and
// comparing each database's update_seq with the one its engine left
// (PouchDB Server); see discovery.go. Each database keeps its own
// checkpoint; an engine stopped while a document waits for a timer is
// started again when the earliest is due, and that due time is kept in the
// database's _local/docstate-<name>-due document (due.go), so a restart of
// the daemon keeps it. Several daemons split the databases by ShardOf.
//
// The supervisor drives its engines through workflow's exported API (New,
// Run, Idle, NextDue, Stats, Options) and, for what only it needs (one
// shared byte budget, the revisions an engine wrote, what a stopped engine
// left), through workflow/internal/supervised.
package supervisor
