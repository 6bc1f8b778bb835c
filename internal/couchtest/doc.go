// Package couchtest runs docstate's tests against a real CouchDB-compatible
// server: PouchDB Server 4.2.0, installed from teststack/package-lock.json by
// scripts/teststack install. Apache CouchDB is not packaged for the machines
// the project builds on; PouchDB Server speaks the same HTTP API closely
// enough for a daemon that follows _changes feeds. Where it differs: it
// answers 401 where CouchDB 3 answers 403, its seq values are numbers, it
// has no /_db_updates, and a database without _security accepts anonymous
// writes.
//
// A test package that needs a server calls Main from TestMain:
//
//	func TestMain(m *testing.M) { couchtest.Main(m) }
//
// Main starts one in-memory server for the package, with an admin user and a
// random password, unless DOCSTATE_TEST_COUCHDB_URL already names a server
// (for example one started by scripts/teststack start). Tests then take an
// admin client with Client and a fresh database per test with NewDB, so tests
// never see each other's documents and can run in parallel.
//
// Tests that stop or restart the server (crash recovery, reconnects) start a
// dedicated process with StartServer and use Kill and Start on it.
//
// The server is never run as "admin party" (no admin configured, everyone is
// admin): that mode accepts every request and would hide permission bugs.
//
// Two PouchDB Server quirks shape this package. It crashes on a non-admin
// PUT /{newdb}, so NewDB always creates databases with the admin client. And
// it may crash on other unusual requests, which is why each test package gets
// its own server process rather than sharing one across packages.
package couchtest
