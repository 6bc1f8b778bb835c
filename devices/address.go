package devices

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// AddressDocType is the type of the per-address rate-limit documents. No
// handler is registered for it: the engine skips them.
const AddressDocType = "device-address"

// addressDocPrefix starts the id of every rate-limit document.
const addressDocPrefix = "device-address:"

// AddressDocID is the id of owner's rate-limit document: a hash, so the
// address itself is not in a document id (ids show in logs and _changes).
func AddressDocID(owner string) string {
	sum := sha256.Sum256([]byte("docstate-address\x00" + strings.ToLower(owner)))
	return addressDocPrefix + hex.EncodeToString(sum[:20])
}

type addressDoc struct {
	ID    string     `json:"_id"`
	Rev   string     `json:"_rev,omitempty"`
	Type  string     `json:"type"`
	Sends []sendMark `json:"sends"`
}

type sendMark struct {
	At        workflow.Stamp `json:"at"`
	MessageID string         `json:"message_id"`
}

// Which limit refused a mail (reserve).
const (
	limitAddress = "address"
	limitGlobal  = "global"
)

// reserve records a mail to owner in its rate-limit document (MVCC: the
// write carries _rev and is redone on 409) unless AddressSends mails were
// already sent to it in the last AddressWindow, and in the global budget
// unless GlobalSends mails to anyone were sent in the last GlobalWindow. It
// reports whether the mail may go, and if not, which limit refused it
// (limitAddress or limitGlobal) and when it may go. A repeat of the same
// Message-ID (a takeover resend) is not counted twice. Counting before
// sending errs on the safe side: a send that then fails still counts.
//
// The address is checked before the global budget is touched, so mail to
// an address over its own limit never spends the global budget; the
// address slot is written only once the global one is taken, so a mail the
// global limit holds back costs its address nothing.
func (d *Devices) reserve(ctx context.Context, owner, messageID string, now time.Time) (ok bool, retryAt time.Time, limit string, err error) {
	id := AddressDocID(owner)
	globalTaken := false
	for range maxWriteTries {
		doc := addressDoc{ID: id, Type: AddressDocType}
		err := d.opts.DB.Get(ctx, id).ScanDoc(&doc)
		if err != nil && !couch.IsNotFound(err) {
			return false, time.Time{}, "", fmt.Errorf("read address limit: %w", err)
		}
		cutoff := now.Add(-d.opts.AddressWindow)
		doc.Sends = slices.DeleteFunc(doc.Sends, func(s sendMark) bool { return s.At.Before(cutoff) })
		if slices.ContainsFunc(doc.Sends, func(s sendMark) bool { return s.MessageID == messageID }) {
			return true, time.Time{}, "", nil
		}
		if len(doc.Sends) >= d.opts.AddressSends {
			oldest := doc.Sends[0].At.Time
			for _, s := range doc.Sends {
				if s.At.Before(oldest) {
					oldest = s.At.Time
				}
			}
			return false, oldest.Add(d.opts.AddressWindow), limitAddress, nil
		}
		if !globalTaken {
			// Taken once per reservation: a 409 on the address document
			// below redoes only the address part. Should that redo find
			// the address full (another daemon got there first), the
			// global slot stays spent: the safe side.
			ok, next, err := d.reserveGlobal(ctx, now)
			if err != nil {
				return false, time.Time{}, "", err
			}
			if !ok {
				return false, next, limitGlobal, nil
			}
			globalTaken = true
		}
		doc.Sends = append(doc.Sends, sendMark{At: workflow.Stamp{Time: now.UTC().Truncate(time.Millisecond)}, MessageID: messageID})
		body, err := json.Marshal(doc)
		if err != nil {
			return false, time.Time{}, "", err
		}
		_, err = d.opts.DB.Put(ctx, id, json.RawMessage(body))
		if couch.IsConflict(err) {
			continue
		}
		if err != nil {
			return false, time.Time{}, "", fmt.Errorf("write address limit: %w", err)
		}
		return true, time.Time{}, "", nil
	}
	return false, time.Time{}, "", fmt.Errorf("address limit document %s kept conflicting", id)
}

// The global budget is split over up to globalShards documents in the
// control database, shard k allowed quota(k) of the GlobalSends, the quotas
// adding up to GlobalSends. Every mail of every daemon writes one of them,
// so a single document would be a queue all sends wait in (every daemon's
// read-modify-write of it racing every other's); split, a send reads all
// shards in one request and writes one that has room, picked at random, and
// the sum still never exceeds GlobalSends, since no shard exceeds its
// quota. The price: when few shards have room left, sends race for them.
// Daemons sharing a control database must agree on GlobalSends and
// GlobalWindow, or each holds to its own quotas.
const globalShards = 16

// globalSlots is how many slots the window is cut into in each shard: the
// limit is a sliding window at that resolution (a mail counts until the end
// of its slot plus the window, at most 1/60 of the window longer than an
// exact window would). A list of every send, as the per-address documents
// keep, would grow with the limit.
const globalSlots = 60

// maxGlobalWriteTries bounds the retries when the shard written was changed
// meanwhile by another send.
const maxGlobalWriteTries = 4 * maxWriteTries

// GlobalDocID is the id of shard k of the global send budget. The ids carry
// the device-address: prefix, which the validation function keeps devices
// from writing; "global-" is no hash, so they name no address.
func GlobalDocID(k int) string { return fmt.Sprintf("%sglobal-%02d", addressDocPrefix, k) }

type globalDoc struct {
	ID    string       `json:"_id"`
	Rev   string       `json:"_rev,omitempty"`
	Type  string       `json:"type"`
	Slots []globalSlot `json:"slots"`
}

// globalSlot counts the mails sent in [Start, Start + GlobalWindow/globalSlots).
type globalSlot struct {
	Start workflow.Stamp `json:"start"`
	Sends int            `json:"sends"`
}

// globalShardCount is how many shards GlobalSends is split over: no more
// than there are mails, so that every quota is at least 1.
func (d *Devices) globalShardCount() int { return min(globalShards, d.opts.GlobalSends) }

func (d *Devices) globalQuota(k int) int {
	n := d.globalShardCount()
	q := d.opts.GlobalSends / n
	if k < d.opts.GlobalSends%n {
		q++
	}
	return q
}

// reserveGlobal counts one mail in a shard of the global budget that has
// room, unless none has, and then says when the first will: when enough of
// its oldest slots have aged out of the window.
//
// It reads one shard picked at random and writes it if it has room: two
// requests, as for the address document, while the budget is far from
// spent. Only when that shard is full are all shards read (one request),
// to find one with room or else the earliest free slot.
func (d *Devices) reserveGlobal(ctx context.Context, now time.Time) (bool, time.Time, error) {
	n := d.globalShardCount()
	ids := make([]string, n)
	for k := range ids {
		ids[k] = GlobalDocID(k)
	}
	for range maxGlobalWriteTries {
		k := rand.IntN(n)
		doc := globalDoc{ID: ids[k], Type: AddressDocType}
		err := d.opts.DB.Get(ctx, ids[k]).ScanDoc(&doc)
		if err != nil && !couch.IsNotFound(err) {
			return false, time.Time{}, fmt.Errorf("read global mail limit: %w", err)
		}
		if _, full := d.shardUse(&doc, k, now); full {
			docs, err := d.readGlobal(ctx, ids)
			if err != nil {
				return false, time.Time{}, err
			}
			var room []int
			var next time.Time
			for j := range docs {
				free, full := d.shardUse(&docs[j], j, now)
				if !full {
					room = append(room, j)
				} else if next.IsZero() || free.Before(next) {
					next = free
				}
			}
			if len(room) == 0 {
				return false, next, nil
			}
			k = room[rand.IntN(len(room))]
			doc = docs[k]
		}
		width := d.opts.GlobalWindow / globalSlots
		current := workflow.Stamp{Time: now.UTC().Truncate(width).Truncate(time.Millisecond)}
		if last := len(doc.Slots) - 1; last >= 0 && doc.Slots[last].Start.Equal(current.Time) {
			doc.Slots[last].Sends++
		} else {
			doc.Slots = append(doc.Slots, globalSlot{Start: current, Sends: 1})
		}
		body, err := json.Marshal(doc)
		if err != nil {
			return false, time.Time{}, err
		}
		_, err = d.opts.DB.Put(ctx, doc.ID, json.RawMessage(body))
		if couch.IsConflict(err) {
			continue // another send wrote that shard meanwhile: pick again
		}
		if err != nil {
			return false, time.Time{}, fmt.Errorf("write global mail limit: %w", err)
		}
		return true, time.Time{}, nil
	}
	return false, time.Time{}, errors.New("global mail limit documents kept conflicting")
}

// shardUse drops the slots of shard doc (number k) that have left the
// window, sorts the rest oldest first, and reports whether the shard's
// quota is used up and, if so, when it frees a place again.
func (d *Devices) shardUse(doc *globalDoc, k int, now time.Time) (free time.Time, full bool) {
	window := d.opts.GlobalWindow
	width := window / globalSlots
	// A slot counts while any of it is inside the window.
	doc.Slots = slices.DeleteFunc(doc.Slots, func(s globalSlot) bool {
		return s.Sends <= 0 || !s.Start.Add(width).After(now.Add(-window))
	})
	slices.SortFunc(doc.Slots, func(a, b globalSlot) int { return a.Start.Compare(b.Start.Time) })
	total := 0
	for _, s := range doc.Slots {
		total += s.Sends
	}
	quota := d.globalQuota(k)
	if total < quota {
		return time.Time{}, false
	}
	for _, s := range doc.Slots {
		total -= s.Sends
		if total < quota {
			return s.Start.Add(width + window), true
		}
	}
	return time.Time{}, true // not reached: total drops to 0 < quota
}

// readGlobal reads the shards in one request. A shard not written yet (or
// deleted) comes back empty, without _rev: its first write creates it.
func (d *Devices) readGlobal(ctx context.Context, ids []string) ([]globalDoc, error) {
	docs := make([]globalDoc, len(ids))
	index := make(map[string]int, len(ids))
	for k, id := range ids {
		docs[k] = globalDoc{ID: id, Type: AddressDocType}
		index[id] = k
	}
	rs := d.opts.DB.AllDocs(ctx, kivik.Params(map[string]any{"keys": ids, "include_docs": true}))
	defer func() { _ = rs.Close() }()
	for rs.Next() {
		id, err := rs.ID()
		k, ok := index[id]
		if err != nil || !ok {
			continue // a missing key's row: {"key": …, "error": "not_found"}
		}
		var doc globalDoc
		if rs.ScanDoc(&doc) != nil || doc.ID != id {
			continue // deleted: no body
		}
		doc.Type = AddressDocType
		docs[k] = doc
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("read global mail limit: %w", err)
	}
	return docs, nil
}
