// Package handlers assembles docstate's built-in handler sets onto a
// workflow registry. It is also the pattern to copy for your own: a handler
// set is a Set (a name and a Register method), listed explicitly in code,
// with a compile-time check that it implements Set. Nothing registers itself
// from init(): what a binary runs is what its main package lists.
//
// Builtin builds the built-in sets from an Env (the configuration and the
// daemon's client, database, logger and listeners) exactly as the docstate
// binary does, so a binary of your own that returns Builtin's sets plus its
// own runs the same device registration and channels: the device set with
// its mailer and, in the users pairing mode, its followers of _users and of
// the owners' control databases (which also answer the channel requests),
// and the channel set. EngineOptions and SupervisorOptions map the
// configuration onto the engine's and the supervisor's options. Package
// cmd/cli only wires these to the command line.
package handlers
