package workflow

import (
	"context"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow/internal/retry"
)

// Several daemons on one database split its documents between them with no
// coordinator but the database: each keeps a membership document alive (a
// lease it renews), reads the others', and hands every document id to one
// live member by rendezvous hashing (highest random weight). A member skips
// the ids that hash to another before reading them, so added daemons add
// throughput instead of repeating each other's work. When the live set
// changes (a daemon joins, stops, or its lease runs out) every member scans
// the database again for the documents that are now its own.
//
// Correctness never depends on the split: members that briefly disagree (a
// stale view of the set, clocks apart) may both run a document, and the
// engine's rules for that case are unchanged: safe handlers are idempotent,
// unsafe ones run only under a claim won through MVCC.

// memberType is the type of membership documents. No handler is ever
// registered for it, so engines pass over them.
const memberType = "docstate-member"

// memberIDPrefix starts every membership document's id; the engine's name
// follows, so different handler sets on one database split independently.
const memberIDPrefix = "docstate-member:"

type memberDoc struct {
	ID      string `json:"_id"`
	Rev     string `json:"_rev,omitempty"`
	Type    string `json:"type"`
	Engine  string `json:"engine"`
	Owner   string `json:"owner"`
	Expires Stamp  `json:"expires"`
	Joined  Stamp  `json:"joined"`
}

// members is this engine's view of the live members of its database.
type members struct {
	db    *kivik.DB
	name  string // engine name
	self  string // this engine's owner id
	lease time.Duration
	log   *slog.Logger
	// changed is signalled (never blocking) when the live set changed, so
	// the resync loop scans for documents that are now this member's.
	changed chan struct{}

	mu   sync.RWMutex
	live []string // sorted owner ids, self included

	// rebalances counts changes of the live set; skipped the runs passed
	// over as another member's.
	rebalances, skipped atomic.Int64
}

func newMembers(db *kivik.DB, name, self string, lease time.Duration, log *slog.Logger) *members {
	return &members{db: db, name: name, self: self, lease: lease, log: log,
		changed: make(chan struct{}, 1), live: []string{self}}
}

func (m *members) docID(owner string) string { return memberIDPrefix + m.name + ":" + owner }

// mine reports whether id is this member's to handle.
func (m *members) mine(id string) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if len(m.live) < 2 {
		return true
	}
	return rendezvous(m.live, id) == m.self
}

// seen returns how many members are live, self included.
func (m *members) seen() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.live)
}

// rendezvous returns the member with the highest weight for id. Each id
// moves only when its own winner joins or leaves, so a change of the set
// moves about 1/n of the ids.
func rendezvous(live []string, id string) string {
	best, bestW := "", uint64(0)
	for _, m := range live {
		if w := weight(m, id); best == "" || w > bestW || (w == bestW && m > best) {
			best, bestW = m, w
		}
	}
	return best
}

func weight(member, id string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(member))
	h.Write([]byte{0})
	h.Write([]byte(id))
	// FNV's low bits mix poorly for similar inputs: finish with
	// splitmix64's avalanche so weights of near-identical ids differ.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// run keeps this member's lease alive and the live set current until ctx
// ends, then removes this member's document so the others take its share
// at once rather than after its lease.
func (m *members) run(ctx context.Context) {
	joined := Stamp{time.Now().UTC().Truncate(time.Millisecond)}
	every := m.lease / 3
	rev := ""
	for {
		var err error
		rev, err = m.renew(ctx, rev, joined)
		if err != nil && ctx.Err() == nil {
			m.log.Warn("membership lease not renewed", "err", err)
		}
		if err := m.refresh(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("membership not read", "err", err)
		}
		if !retry.Sleep(ctx, every) {
			break
		}
	}
	// The engine is stopping: its drain still finishes what it started,
	// under claims, so leaving now only lets the others start sooner.
	leave, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := m.remove(leave); err != nil {
		m.log.Warn("membership document not removed at stop; the others wait out its lease", "err", err)
	}
}

// renew writes this member's document with a fresh expiry.
func (m *members) renew(ctx context.Context, rev string, joined Stamp) (string, error) {
	id := m.docID(m.self)
	for range 3 {
		doc := memberDoc{ID: id, Rev: rev, Type: memberType, Engine: m.name, Owner: m.self, Joined: joined,
			Expires: Stamp{time.Now().Add(m.lease).UTC().Truncate(time.Millisecond)}}
		newRev, err := m.db.Put(ctx, id, doc)
		if err == nil {
			return newRev, nil
		}
		if !couch.IsConflict(err) {
			return rev, fmt.Errorf("write %s: %w", id, err)
		}
		// Our own earlier write whose answer was lost, or a re-created
		// database: take the current revision.
		var cur struct {
			Rev string `json:"_rev"`
		}
		if err := m.db.Get(ctx, id).ScanDoc(&cur); err != nil && !couch.IsNotFound(err) {
			return rev, fmt.Errorf("read %s: %w", id, err)
		}
		rev = cur.Rev
	}
	return rev, fmt.Errorf("write %s: kept conflicting", id)
}

// refresh reads every membership document of this engine's name and
// updates the live set.
func (m *members) refresh(ctx context.Context) error {
	prefix := memberIDPrefix + m.name + ":"
	rows := m.db.AllDocs(ctx, kivik.Params(map[string]any{
		"startkey": prefix, "endkey": prefix + "\ufff0", "include_docs": true,
	}))
	now := time.Now()
	live := []string{m.self}
	for rows.Next() {
		var d memberDoc
		if err := rows.ScanDoc(&d); err != nil {
			continue // a deleted row has no doc; a foreign shape is not a member
		}
		if d.Type != memberType || d.Owner == "" || d.Owner == m.self || !strings.HasPrefix(d.ID, prefix) {
			continue
		}
		if d.Expires.After(now) {
			live = append(live, d.Owner)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("list members: %w", err)
	}
	slices.Sort(live)
	live = slices.Compact(live)
	m.mu.Lock()
	old := m.live
	m.live = live
	m.mu.Unlock()
	if !slices.Equal(old, live) {
		m.rebalances.Add(1)
		m.log.Info("members changed; rescanning for this member's share", "members", len(live), "before", len(old))
		select {
		case m.changed <- struct{}{}:
		default:
		}
	}
	return nil
}

// remove deletes this member's document.
func (m *members) remove(ctx context.Context) error {
	id := m.docID(m.self)
	var cur struct {
		Rev string `json:"_rev"`
	}
	if err := m.db.Get(ctx, id).ScanDoc(&cur); err != nil {
		if couch.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("read %s: %w", id, err)
	}
	if _, err := m.db.Delete(ctx, id, cur.Rev); err != nil && !couch.IsNotFound(err) {
		return fmt.Errorf("delete %s: %w", id, err)
	}
	return nil
}
