package devices

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

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

// reserve records a mail to owner in its rate-limit document (MVCC: the
// write carries _rev and is redone on 409) unless AddressSends mails were
// already sent to it in the last AddressWindow. It reports whether the mail
// may go, and if not, when it may. A repeat of the same Message-ID (a
// takeover resend) is not counted twice. Counting before sending errs on the
// safe side: a send that then fails still counts.
func (d *Devices) reserve(ctx context.Context, owner, messageID string, now time.Time) (bool, time.Time, error) {
	id := AddressDocID(owner)
	for range maxWriteTries {
		doc := addressDoc{ID: id, Type: AddressDocType}
		err := d.opts.DB.Get(ctx, id).ScanDoc(&doc)
		if err != nil && !couch.IsNotFound(err) {
			return false, time.Time{}, fmt.Errorf("read address limit: %w", err)
		}
		cutoff := now.Add(-d.opts.AddressWindow)
		doc.Sends = slices.DeleteFunc(doc.Sends, func(s sendMark) bool { return s.At.Before(cutoff) })
		if slices.ContainsFunc(doc.Sends, func(s sendMark) bool { return s.MessageID == messageID }) {
			return true, time.Time{}, nil
		}
		if len(doc.Sends) >= d.opts.AddressSends {
			oldest := doc.Sends[0].At.Time
			for _, s := range doc.Sends {
				if s.At.Before(oldest) {
					oldest = s.At.Time
				}
			}
			return false, oldest.Add(d.opts.AddressWindow), nil
		}
		doc.Sends = append(doc.Sends, sendMark{At: workflow.Stamp{Time: now.UTC().Truncate(time.Millisecond)}, MessageID: messageID})
		body, err := json.Marshal(doc)
		if err != nil {
			return false, time.Time{}, err
		}
		_, err = d.opts.DB.Put(ctx, id, json.RawMessage(body))
		if couch.IsConflict(err) {
			continue
		}
		if err != nil {
			return false, time.Time{}, fmt.Errorf("write address limit: %w", err)
		}
		return true, time.Time{}, nil
	}
	return false, time.Time{}, fmt.Errorf("address limit document %s kept conflicting", id)
}
