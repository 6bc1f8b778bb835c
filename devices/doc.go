// Package devices registers devices through an email confirmation loop: a
// device asks for CouchDB credentials, the owner proves the email address
// with a code (or a link), and docstate provisions the device's _users entry
// with the owner's role and nothing else.
//
// # Flow
//
// A device writes a document into the control database (directly or by
// replication):
//
//	{"_id": "<device chooses>", "type": "device", "state": "new",
//	 "owner": "alice@example.com", "device_name": "Alice's phone",
//	 "credentials": {"password_scheme": "pbkdf2", "derived_key": "<40 hex>",
//	                 "salt": "<32-128 hex>", "iterations": 10000}}
//
// The device picks a random password (at least 128 bits, ASCII, e.g. hex),
// and computes derived_key = hex(PBKDF2-HMAC-SHA1(password, salt as its
// ASCII bytes, iterations, 20 bytes)) itself. The password never leaves the
// device. This is the form CouchDB's _users stores and checks for
// password_scheme "pbkdf2" without a pbkdf2_prf field (CouchDB 3.x, SHA-1),
// and the only one PouchDB Server (pouchdb-auth: PBKDF2-SHA1, 20 bytes, salt
// as a string) checks. Iterations are bounded (Options.MaxIterations) because
// the server pays them on every basic-auth request; with a random 128-bit
// password a low count loses nothing.
//
//	new ──(code mailed)──▶ confirming ──(right code or link)──▶ active ──(revoke_requested)──▶ revoked
//	 │                        │ ├─(code_expires passed)──▶ expired
//	 │                        │ └─(MaxAttempts wrong codes)─▶ locked
//	 └─(invalid fields, SMTP 5xx, retries used up)──▶ error (engine; reason in docstate.error)
//
// # States
//
//   - new: Unsafe handler, RetryExpired. Validates every field (a failure is
//     terminal: state error, reason "invalid device document: …", no mail).
//     Derives the code, link token and Message-ID from the claim (see
//     below), reserves a slot in the owner's address limit and in the
//     global one, mails the code (text + HTML), records hashes and moves to
//     confirming. SMTP 4xx and network errors retry with the engine's
//     backoff; 5xx to MAIL/RCPT/DATA is terminal with the server's reply as
//     reason (addresses scrubbed, see below). When either limit is used up
//     the mail waits (send_delayed says which, wake-up at the next slot).
//   - confirming: Unsafe handler, RetryExpired. Counts a guess before it
//     checks it: one run moves confirm_attempt or confirm_link into
//     pending_check with failed_attempts + 1, the next checks it against
//     the stored HMACs in constant time; right → the
//     _users entry is written and the device is active; wrong → counted in
//     failed_attempts with last_attempt_error, and at MaxAttempts → locked.
//     resend_requested → a new code unless the last mail went out less than
//     ResendInterval ago or a mail limit is used up (then resend_denied
//     says why). Without a request the handler stays with a
//     wake-up at code_expires, so the engine's timed scan moves the device
//     to expired even if nothing else happens. It is Unsafe although it
//     sends no mail in the common case because the claim serialises checks
//     across engines: each check is counted by the write that releases its
//     claim, so concurrent attempts from several workers cannot get more
//     than MaxAttempts checks. (A Safe handler could check a guess, provision
//     the user on a right one, then lose its write to a 409: an uncounted
//     check.)
//   - active: Safe handler. revoke_requested: true deletes the _users entry
//     and moves to revoked.
//   - expired, locked, revoked: terminal, no handler. The device starts over
//     with a new document. An operator can re-drive error with the CLI.
//
// # Fields
//
// Written by the device: owner, device_name, credentials (in new);
// confirm_attempt (string, the code; spaces and dashes ignored),
// resend_requested (true) in confirming; revoke_requested (true) in active.
//
// Written by docstate: code_hash, link_hash (hex HMAC-SHA256 of the code or
// link token under the secret and the doc id), code_expires, sends,
// last_sent_at, message_id, failed_attempts, last_attempt_error,
// resend_denied, send_delayed, confirm_link (written by the confirmation
// page: an HMAC proving the link token was presented, never the token),
// reason (why expired, locked or revoked), couch_user, owner_role,
// activated_at, revoked_at. Times are RFC 3339 UTC. The engine's own
// bookkeeping is under docstate.
//
// # Secrets
//
// No plaintext code or token is ever written by docstate, logged, or put in
// a metric: documents hold HMAC-SHA256(secret, doc id, code), and logs name
// the doc id and Message-ID only. The code and token are HMAC outputs under
// Options.Secret (from crypto/rand, read from a file) over the claim's
// idempotency key, the send count, the owner and the device's salt. Deriving
// instead of drawing fresh makes the resend after a crash the same mail
// (below). The code is 8 digits: with 5 attempts a guesser's chance is 5e-8.
//
// The device's own attempt is plaintext in the revision it writes, and
// CouchDB keeps old revision bodies until compaction. That is acceptable:
// the code authorises exactly this document's credentials, which were fixed
// when the device wrote it, so whoever reads the attempt learns nothing that
// activates anything else; a wrong guess is worthless, and a right one is
// consumed by the run that reads it (the hash is removed, the state leaves
// confirming). The link flow avoids even that: the page writes a proof, not
// the token.
//
// # Crash between sending and recording
//
// The handlers are Unsafe with workflow.RetryExpired. If an engine dies after
// the SMTP server accepted the mail but before the transition was written,
// the claim's lease runs out and another engine takes it over with the same
// Claim.Key. The code, token and Message-ID derive from that key, so the
// resend is the same mail again: same Message-ID, same code (only the Date
// and the "valid until" line differ). Receivers and the user see a duplicate
// of one message, never two different codes. This is at-least-once with a
// stable idempotency key; exactly-once across SMTP is impossible.
//
// # Rate limits
//
// Per device: a resend is refused within ResendInterval of the last mail.
// Per address: at most AddressSends mails per AddressWindow to one owner,
// over all their devices, counted in a document "device-address:<hash of the
// address>" (type device-address, no handler) in the control database,
// updated with MVCC. A takeover resend with the same Message-ID is not
// counted twice. Wrong attempts are counted over the whole registration and
// a resend does not reset them.
//
// Global: at most GlobalSends mails per GlobalWindow in all, whatever the
// addresses, so that strangers writing device documents cannot make the
// daemon mail the world at AddressSends each. Counted in up to 16 shard
// documents GlobalDocID(k) (type device-address) in the control database:
// each shard holds a fixed share of GlobalSends as a 60-slot sliding window,
// a send reads one shard at random and writes it with MVCC if it has room,
// and reads all of them (one _all_docs) only when that one is full. The
// total holds exactly over every daemon on the database, provided they are
// configured alike. The address limit is checked first and charged only
// after the global slot is taken, so neither limit spends the other.
//
// # No address in logs or reasons
//
// Every error the handlers return is scrubbed before the engine logs it and
// records it in docstate.last_error or docstate.error.reason, and so is
// every error and warning of SMTPMailer: the owner's address in any letter
// case and its local part (3 characters or more, whole word) become
// "<owner>", other address-shaped text "<address>"; the sender and
// docstate's Message-IDs stay. go-mail's errors end in "affected
// recipient(s): <address>" and relays echo addresses in their replies. The
// error chain is kept (errors.As, workflow.IsTerminal).
//
// # CouchDB users and roles
//
// The _users entry is org.couchdb.user:<UserName(doc id, salt)>, with the
// device's derived_key, salt and iterations, roles [OwnerRole(owner)] and
// docstate_device: <doc id> marking whose it is: an existing entry of that
// name owned by another document is never overwritten. OwnerRole is "owner-"
// + 40 hex digits of SHA-256 over a fixed prefix and the lower-cased
// address; a channel database admits the owner's devices by listing that
// role in its _security members. Revocation deletes the entry, which also
// ends cookie sessions.
//
// # Trust in the control database
//
// The handlers trust the fields docstate writes (code_hash, failed_attempts,
// code_expires …), so devices must not be able to write them. InstallValidation
// puts a validate_doc_update function into the control database (the daemon
// calls it at every start): non-admins may create a "new" device document
// with only the request fields, and afterwards change only confirm_attempt
// and resend_requested (in confirming) and revoke_requested (in active);
// everything else must stay as it is, deletes and other document types are
// refused, and the reason names the field. The daemon writes as a server
// admin, which the function lets through.
//
// A validation function checks a replicated revision against its stored
// parent, not the current winner: on CouchDB 3 a device could replicate in a
// longer branch forked from an older confirming revision with fewer failed
// attempts. The confirming handler therefore reads the document's
// conflicting revisions, keeps the highest failed_attempts of all branches
// and deletes the losing ones before it checks anything.
//
// PouchDB Server differs in two ways: it runs the function before checking
// _rev, so a device's write on a stale revision gets 403 instead of 409
// (re-read and retry on either), and once any validation function is
// installed it drops replicated updates of existing documents (new_edits=
// false), so devices that replicate their updates need CouchDB.
//
// # Confirmation link
//
// With Options.BaseURL set, mail carries BaseURL/devices/confirm?d=<doc
// id>&t=<token>. Handler serves it: GET shows a page with a Confirm button
// and changes nothing (mail scanners prefetch links); POST verifies the
// token against link_hash in constant time and writes confirm_link with
// MVCC, for the confirming handler to finish. Responses are no-store,
// no-referrer and not framable.
package devices
