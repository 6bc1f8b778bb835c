// Package channels is the built-in handler set for per-user channels: a
// channel is a CouchDB database shared by all of a user's devices. For a
// channel document (type "channel") the daemon creates the database, sets
// and verifies its _security so only the members' device users and roles
// can read it, writes its description document, and wires replication to
// every active device of every member; removed members and deleted channels
// are deprovisioned.
//
// The handlers are specified in issue 4 and DESIGN.md ("Channels"); this
// package holds no code until they are built, and the daemon registers no
// channel handlers until then.
package channels
