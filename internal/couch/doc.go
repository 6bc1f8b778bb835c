// Package couch builds the CouchDB clients docstate uses and classifies the
// errors they return.
//
// Every client is built the same way, in the daemon and in tests, because two
// transport details matter for correctness and speed: response compression is
// off (a gzipping server holds back streamed _changes feeds) and request bodies
// are sent uncompressed (about twice the write rate on the test server).
// Long requests are bounded by contexts, never by http.Client.Timeout, which
// would cut a longpoll feed that is working as intended. A request may carry a
// body limit in its context (WithBodyLimit): the transport then refuses a
// document over it without reading it, and strips such documents from a
// _changes response while it streams.
package couch
