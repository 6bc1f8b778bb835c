// Package devicetest runs real devices for tests: each Device is a Node.js
// process running the PouchDB client (npm pouchdb, pinned in teststack/) with
// its own local databases, driven over stdin/stdout by teststack/device.js.
// A device replicates with the server as an app would, can go offline and
// come back, and can also send raw HTTP requests, for hostile clients.
//
// A test starts one with Start; the process is stopped when the test ends.
package devicetest
