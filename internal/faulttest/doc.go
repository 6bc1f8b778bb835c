// Package faulttest proves docstate's promises under faults: it runs the
// real daemon binary (faultd: docstate's built-in device and channel sets
// plus a safe and an unsafe job) over a mixed workload, kills it with
// SIGKILL at random points, kills and restarts the CouchDB-compatible
// server, and drops the SMTP relay, then checks that nothing was lost and
// no unsafe side effect doubled.
//
// It holds tests only, and the faultd command they build.
package faulttest
