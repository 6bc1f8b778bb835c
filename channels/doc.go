// Package channels is the built-in handler set for per-user channels: a
// channel is a CouchDB database shared by the devices of its owner and its
// members. For a channel document in the control database the daemon
// creates the database, claims it with a description document, sets its
// _security to the members' device roles and reads it back to prove it
// took, and writes a subscription document for every active device of every
// member, which the device reads to start its own replication. Removed
// members are revoked, and deleted channels deprovisioned.
//
// # Flow
//
// An application (as a server admin: the devices validation function
// refuses other document types from devices) writes into the control
// database:
//
//	{"_id": "<any>", "type": "channel", "state": "new",
//	 "owner": "alice@example.com", "name": "Family Photos",
//	 "members": ["bob@example.com"]}
//
//	new ──(database created, claimed, secured, verified)──▶ ready ──(delete_requested)──▶ deleting ──▶ deleted
//	 └─(invalid fields, name collision, retries used up)──▶ error (engine; reason in docstate.error)
//
// # States
//
//   - new: Safe. Validates owner (a bare email address), name (1–200 bytes
//     of UTF-8 without control characters) and members (at most
//     MaxMembers addresses); any problem is terminal with a reason naming
//     the field. Derives the database name (DBName), creates it (412: it
//     exists, fine), writes the description document "channel" into it
//     unless one written for another channel document is there (then the
//     same owner has a channel of that name: terminal, "already belongs to
//     channel document …"), sets _security and reads it back, and moves to
//     ready with database, url and member_roles recorded.
//   - ready: Safe. Re-applies _security from the current owner and members
//     (so removing a member revokes them), and makes the subscriptions
//     exactly one per active device whose owner_role is a member's: new
//     ones are written, stale ones updated, ones of removed members or
//     revoked devices deleted. It stays and rechecks every ReconcileInterval
//     (workflow.Result.RecheckAfter: nothing is written while nothing
//     changed, so an idle channel makes no revisions for devices to
//     replicate), so
//     a device activated later gets every existing channel within that
//     interval. A reconcile that wrote subscriptions reads the document
//     again and takes them back if it is no longer ready, so that a
//     deletion finished meanwhile by another daemon leaves none behind.
//     delete_requested: true moves it to deleting.
//   - deleting: Safe. Deletes every subscription of the channel, then the
//     database (OnDelete "delete") or archives it ("archive": members set
//     to the _admin role, which no user has, so only server admins read
//     it; an empty members list would make it public in CouchDB). Then
//     deleted, a terminal state. Without a database field (a daemon died
//     between provisioning and ready, then deletion was requested) it
//     takes the derived name, but only if that database's description
//     document names this channel document.
//
// Every step is idempotent (create-if-absent, set-and-verify, stable ids,
// compare-and-swap), so the handlers are Safe: a repeat after a crash, or
// the same document handled by two daemons at once, changes nothing twice.
//
// # Security model
//
// _security admits the roles devices.OwnerRole(owner) and OwnerRole(m) for
// every member — the one role each active device's _users entry has — with
// no names and no database admins (server admins, the daemon among them,
// always pass). A device of someone else gets 401/403 on every read and
// write. The database is claimed by its description document before
// _security is set, so a colliding channel document never gets its members
// onto another channel's database. Between creation and the _security write
// CouchDB 3 databases are admin-only by default (PouchDB Server's are open
// for that moment).
//
// # Subscriptions
//
// Subscription documents (type "subscription", id SubscriptionID(channel
// doc, device doc)) live in the control database: channel, device,
// owner_role, couch_user, database, url (PublicURL/<database> when set) and
// direction "both". Their ids are stable, so two daemons write the same
// documents. A device finds its own by owner_role or device and replicates
// the channel both ways with its own credentials; once it is revoked or its
// owner removed, its subscription disappears and _security refuses it.
//
// # Channels in the owners' control databases
//
// With devices paired through their own users (devices.PairingUsers), a
// device asks for channels by replication: it writes a new channel_request
// document (action create, rename, add_members, remove_members or delete;
// channel, a slug; name; members) into its owner's control database
// (userctl-*), offline if need be. RegisterUserDBs registers the handlers
// for the supervisor over those databases (devices.FollowerOptions.Handlers):
//
//   - channel_request new: Safe. Applies the request to the channel document
//     "channel:" + slug in the same database, which only the daemon writes,
//     by compare-and-swap; the channel document remembers the requests it
//     took, so a request run twice changes it once. The request becomes
//     applied (channel_doc, applied_at) or refused (reason).
//   - channel new/ready: Safe. As for the shared control database, with the
//     database derived from the owner's role and the slug
//     (UserChannelDB): created, claimed, _security set and read back. Each
//     admitted role's invitation list (channel-invites:<role>, in the
//     control database) holds the channel, and each role's own control
//     database one subscription per channel (UserSubscriptionPrefix +
//     database), for all of that member's devices. Nothing is written while
//     nothing changed; _security is rechecked every ReconcileInterval.
//   - channel deleting: Safe. Invitations and subscriptions taken back, the
//     database deleted or archived, then deleted.
//   - device_info active (written by the devices set at activation): Safe.
//     The owner's control database is made to match their invitation list,
//     so a member invited before they had a device gets the channel at once.
//
// Requests are new documents rather than edits: an offline edit of a
// document the daemon also writes would become a conflict whose losing side
// is lost, and PouchDB Server drops replicated updates of existing
// documents.
//
// Hard-deleting a channel document (_deleted) instead of setting
// delete_requested leaves its database and subscriptions behind: the engine
// never sees deleted documents' fields. Renaming a ready channel does not
// move its database.
package channels
