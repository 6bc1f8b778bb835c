// Package admin holds docstate's operator tools over one workflow
// database: Inspect summarises it (docstate status), Retry moves failed
// documents back to the state they failed in (docstate retry), Replay makes
// the engine handle documents again in their state (docstate replay), and
// ChangedSince selects documents by feed position (replay --since).
//
// They work on the documents and the engine's stored bookkeeping
// (workflow.Meta, the checkpoint), not on a running engine: an engine
// running meanwhile sees their writes as changes.
package admin
