#!/usr/bin/env node
// A real device for docstate's tests: the PouchDB client (npm pouchdb, pinned
// in package.json) with its own local databases on disk, replicating with a
// CouchDB server over HTTP as an app on a phone or laptop would. The Go
// harness (internal/devicetest) drives it with one JSON object per line on
// stdin and reads one answer per line on stdout:
//
//   {"id": 1, "op": "put", "db": "control", "doc": {...}}
//   {"id": 1, "ok": true, "result": {"id": "...", "rev": "..."}}
//   {"id": 2, "error": "not_found: missing", "status": 404}
//
// Requests run concurrently; answers carry the request's id. Ops:
//   put {db, doc}                 write to a local database
//   get {db, docid}               read a local document (404 when missing)
//   all {db}                      every local document, design docs excluded
//   replicate {db, url, user, password, direction, live, filter_ids}
//                                 push, pull or sync with a remote database;
//                                 one-shot answers when done, live answers at
//                                 once with {handle} and keeps retrying
//   status {handle}               a live replication's last state and error
//   cancel {handle}               stop a live replication
//   offline / online              cut or restore every connection of this
//                                 device (requests fail as on a lost network)
//   wait_for {db, docid, fields, timeout_ms}
//                                 until the local document has every field
//                                 equal to fields (deep JSON equality)
//   http {method, url, user, password, body, headers}
//                                 one raw request, for hostile clients;
//                                 answers {status, body}
// The process exits when stdin closes. Its local data lives under argv[2].
'use strict';

const path = require('path');
const readline = require('readline');
const PouchDB = require('pouchdb');

const dir = process.argv[2];
if (!dir) {
  process.stderr.write('usage: device.js <data dir>\n');
  process.exit(2);
}

let offline = false;
// Every request this device makes goes through here, so offline cuts them
// all, as a lost network would, and an in-flight request fails too.
const inflight = new Set();
function deviceFetch(url, opts) {
  if (offline) {
    return Promise.reject(new TypeError('network is offline (device.js offline)'));
  }
  const ctl = new AbortController();
  const o = Object.assign({}, opts || {});
  if (o.signal) {
    o.signal.addEventListener('abort', () => ctl.abort());
  }
  o.signal = ctl.signal;
  inflight.add(ctl);
  return PouchDB.fetch(url, o).finally(() => inflight.delete(ctl));
}

const locals = new Map();
function local(name) {
  if (typeof name !== 'string' || !/^[a-z][a-z0-9_-]*$/.test(name)) {
    throw Object.assign(new Error('bad local database name: ' + JSON.stringify(name)), { status: 400 });
  }
  let db = locals.get(name);
  if (!db) {
    db = new PouchDB(path.join(dir, name));
    locals.set(name, db);
  }
  return db;
}

function remote(url, user, password) {
  const opts = { fetch: deviceFetch, skip_setup: true };
  if (user) {
    opts.auth = { username: user, password: password || '' };
  }
  return new PouchDB(url, opts);
}

const live = new Map();
let nextHandle = 1;

function deepEqual(a, b) {
  return JSON.stringify(canon(a)) === JSON.stringify(canon(b));
}
function canon(v) {
  if (Array.isArray(v)) return v.map(canon);
  if (v && typeof v === 'object') {
    const out = {};
    for (const k of Object.keys(v).sort()) out[k] = canon(v[k]);
    return out;
  }
  return v;
}

function matches(doc, fields) {
  return Object.keys(fields || {}).every((k) => deepEqual(doc[k], fields[k]));
}

async function waitFor(req) {
  const db = local(req.db);
  const deadline = Date.now() + (req.timeout_ms || 10000);
  let last = null;
  for (;;) {
    try {
      last = await db.get(req.docid);
      if (matches(last, req.fields)) return last;
    } catch (err) {
      if (err.status !== 404) throw err;
    }
    if (Date.now() > deadline) {
      throw Object.assign(new Error('timed out waiting for ' + req.docid + ' to have ' +
        JSON.stringify(req.fields) + '; last seen ' + JSON.stringify(last)), { status: 408 });
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

function replicate(req) {
  const db = local(req.db);
  const rem = remote(req.url, req.user, req.password);
  const opts = {};
  if (Array.isArray(req.filter_ids)) opts.doc_ids = req.filter_ids;
  if (req.live) {
    opts.live = true;
    opts.retry = true;
    // A short, constant backoff: a device that comes back online is
    // expected to catch up at once, not after a growing pause.
    opts.back_off_function = () => 200;
  }
  let rep;
  switch (req.direction) {
    case 'push': rep = db.replicate.to(rem, opts); break;
    case 'pull': rep = db.replicate.from(rem, opts); break;
    case 'sync': rep = db.sync(rem, opts); break;
    default:
      throw Object.assign(new Error('direction must be push, pull or sync'), { status: 400 });
  }
  if (!req.live) {
    return rep.then((info) => summary(info));
  }
  const handle = nextHandle++;
  const st = { rep, state: 'active', error: null, docs_written: 0, docs_read: 0 };
  const count = (info) => {
    const c = info && (info.change || info);
    if (c && typeof c.docs_written === 'number') st.docs_written = c.docs_written;
    if (c && typeof c.docs_read === 'number') st.docs_read = c.docs_read;
  };
  rep.on('change', (info) => { st.state = 'active'; st.error = null; count(info); });
  rep.on('paused', (err) => { st.state = 'paused'; st.error = err ? String(err.message || err) : null; });
  rep.on('active', () => { st.state = 'active'; });
  rep.on('denied', (err) => { st.error = 'denied: ' + String((err && err.message) || err); });
  rep.on('error', (err) => { st.state = 'error'; st.error = String((err && err.message) || err); });
  rep.on('complete', (info) => { if (st.state !== 'error') st.state = 'complete'; count(info); });
  live.set(handle, st);
  return Promise.resolve({ handle });
}

function summary(info) {
  const pick = (i) => i && { ok: i.ok, docs_read: i.docs_read, docs_written: i.docs_written,
    doc_write_failures: i.doc_write_failures, errors: (i.errors || []).map(String) };
  if (info && (info.push || info.pull)) return { push: pick(info.push), pull: pick(info.pull) };
  return pick(info);
}

async function rawHTTP(req) {
  const headers = Object.assign({ Accept: 'application/json' }, req.headers || {});
  if (req.user) {
    headers.Authorization = 'Basic ' + Buffer.from(req.user + ':' + (req.password || '')).toString('base64');
  }
  let body;
  if (req.body !== undefined) {
    body = typeof req.body === 'string' ? req.body : JSON.stringify(req.body);
    if (!headers['Content-Type']) headers['Content-Type'] = 'application/json';
  }
  const res = await deviceFetch(req.url, { method: req.method || 'GET', headers, body });
  const text = await res.text();
  let parsed = text;
  try { parsed = JSON.parse(text); } catch (_) { /* not JSON: kept as text */ }
  return { status: res.status, body: parsed };
}

async function run(req) {
  switch (req.op) {
    case 'put': return local(req.db).put(req.doc);
    case 'get': return local(req.db).get(req.docid, { conflicts: true });
    case 'all': {
      const res = await local(req.db).allDocs({ include_docs: true });
      return res.rows.filter((r) => !r.id.startsWith('_design/')).map((r) => r.doc);
    }
    case 'replicate': return replicate(req);
    case 'status': {
      const st = live.get(req.handle);
      if (!st) throw Object.assign(new Error('no live replication ' + req.handle), { status: 404 });
      return { state: st.state, error: st.error, docs_written: st.docs_written, docs_read: st.docs_read };
    }
    case 'cancel': {
      const st = live.get(req.handle);
      if (st) { st.rep.cancel(); live.delete(req.handle); }
      return {};
    }
    case 'offline':
      offline = true;
      for (const ctl of inflight) ctl.abort();
      return {};
    case 'online':
      offline = false;
      return {};
    case 'wait_for': return waitFor(req);
    case 'http': return rawHTTP(req);
    default:
      throw Object.assign(new Error('unknown op ' + JSON.stringify(req.op)), { status: 400 });
  }
}

// Cutting the network aborts requests under way; node-fetch then raises the
// abort on a response stream nobody listens to any more. That is the lost
// network this device simulates, not a bug: anything else still ends it.
function isAbort(err) {
  return err && (err.name === 'AbortError' || err.type === 'aborted');
}
process.on('uncaughtException', (err) => {
  if (isAbort(err)) return;
  process.stderr.write('device.js: ' + ((err && err.stack) || err) + '\n');
  process.exit(1);
});
process.on('unhandledRejection', (err) => {
  if (isAbort(err)) return;
  process.stderr.write('device.js: unhandled rejection: ' + ((err && err.stack) || err) + '\n');
  process.exit(1);
});

function answer(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let req;
  try {
    req = JSON.parse(line);
  } catch (err) {
    answer({ id: null, error: 'bad request line: ' + err.message, status: 400 });
    return;
  }
  Promise.resolve()
    .then(() => run(req))
    .then((result) => answer({ id: req.id, ok: true, result: result === undefined ? null : result }))
    .catch((err) => answer({ id: req.id, error: String((err && (err.name && err.message ? err.name + ': ' + err.message : err.message)) || err),
      status: (err && err.status) || 500 }));
});
rl.on('close', async () => {
  for (const st of live.values()) st.rep.cancel();
  await Promise.allSettled([...locals.values()].map((db) => db.close()));
  process.exit(0);
});
