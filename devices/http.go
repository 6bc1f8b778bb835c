package devices

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/workflow"
)

// ConfirmPath is where Handler serves the confirmation page.
const ConfirmPath = "/devices/confirm"

const (
	maxIDLen        = 512
	tokenLen        = 43 // base64url of 32 bytes, no padding
	maxFormBytes    = 4 << 10
	httpReadTimeout = 10 * time.Second
)

const pageHTML = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>{{.Title}}</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 3em auto">
<h1>{{.Title}}</h1>
<p>{{.Text}}</p>
{{if .Form}}<form method="post" action="{{.Action}}">
<input type="hidden" name="d" value="{{.DocID}}">
<input type="hidden" name="t" value="{{.Token}}">
<button type="submit">Confirm</button>
</form>{{end}}
</body></html>
`

type page struct {
	Title, Text, Action, DocID, Token string
	Form                              bool
}

// Handler serves the confirmation link. GET shows a page with a button and
// changes nothing: mail scanners and link previews fetch links. POST checks
// the token against the stored hash, in constant time, and writes a proof
// (an HMAC of the stored hash, never the token) into the device document
// with MVCC; the engine's confirming handler then counts it like a code.
// Every failure gets the same page, whether the document exists or not.
func (d *Devices) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ConfirmPath, d.confirmPage)
	mux.HandleFunc("POST "+ConfirmPath, d.confirmPost)
	return mux
}

func (d *Devices) write(w http.ResponseWriter, status int, p page) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	// The token is in the URL: never send it on in a Referer.
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; form-action 'self'; frame-ancestors 'none'")
	w.WriteHeader(status)
	_ = d.page.Execute(w, p)
}

func invalidPage() page {
	return page{Title: "Link not valid",
		Text: "This confirmation link is not valid, was already used, or has expired. Ask for a new code on your device."}
}

// plausible reports whether docID and token can be from a link the daemon
// mailed. Anything else gets the invalid-link page before the database is
// asked: an id from the query goes into a CouchDB request path, and one
// starting with "_" names a design document or an endpoint (_all_docs,
// _changes), while PouchDB Server answers a non-UTF-8 one with an error
// other than 404, which showed as "try again" (503) instead of a refusal.
func plausible(docID, token string) bool {
	return linkDocID(docID) && linkToken(token)
}

// linkDocID reports whether id can be a device document the daemon mails a
// link for: 1 to maxIDLen bytes of UTF-8 without control characters, not
// reserved by CouchDB ("_") and not a rate-limit document. send leaves the
// link out of the mail for any other id (the code still works), so no
// mailed link is refused here.
func linkDocID(id string) bool {
	if id == "" || len(id) > maxIDLen || !utf8.ValidString(id) ||
		strings.HasPrefix(id, "_") || strings.HasPrefix(id, addressDocPrefix) {
		return false
	}
	for _, r := range id {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// linkToken reports whether t has the form of a token: unpadded base64url
// of 32 bytes.
func linkToken(t string) bool {
	if len(t) != tokenLen {
		return false
	}
	for i := range len(t) {
		c := t[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func (d *Devices) confirmPage(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	docID, token := q.Get("d"), q.Get("t")
	if !plausible(docID, token) {
		d.write(w, http.StatusNotFound, invalidPage())
		return
	}
	d.write(w, http.StatusOK, page{
		Title: "Confirm your device", Form: true, Action: ConfirmPath, DocID: docID, Token: token,
		Text: "Press the button to add the device to your account. If you did not ask for this, close this page.",
	})
}

func (d *Devices) confirmPost(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if err := r.ParseForm(); err != nil {
		d.write(w, http.StatusBadRequest, invalidPage())
		return
	}
	docID, token := r.PostForm.Get("d"), r.PostForm.Get("t")
	if !plausible(docID, token) {
		d.write(w, http.StatusNotFound, invalidPage())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), httpReadTimeout)
	defer cancel()
	switch err := d.recordLink(ctx, docID, token); {
	case err == nil:
		d.write(w, http.StatusOK, page{Title: "Device confirmed",
			Text: "Thank you. The device is being activated and will be ready in a moment."})
	case errors.Is(err, errLinkInvalid):
		d.write(w, http.StatusForbidden, invalidPage())
	default:
		d.log.Warn("confirmation link not recorded", "id", docID, "err", err)
		d.write(w, http.StatusServiceUnavailable, page{Title: "Try again",
			Text: "The confirmation could not be recorded just now. Please reload this page in a minute."})
	}
}

type linkError string

func (e linkError) Error() string { return string(e) }

const errLinkInvalid = linkError("link not valid")

// recordLink verifies the token and writes the proof with the document's
// _rev, re-reading on 409.
func (d *Devices) recordLink(ctx context.Context, docID, token string) error {
	for range maxWriteTries {
		var doc map[string]json.RawMessage
		err := d.opts.DB.Get(ctx, docID).ScanDoc(&doc)
		if couch.IsNotFound(err) {
			return errLinkInvalid
		}
		if err != nil {
			return err
		}
		var typ, state, linkHash string
		var expires workflow.Stamp
		_ = json.Unmarshal(doc["type"], &typ)
		_ = json.Unmarshal(doc["state"], &state)
		_ = json.Unmarshal(doc[FieldLinkHash], &linkHash)
		_ = json.Unmarshal(doc[FieldCodeExpires], &expires)
		if typ != DocType || state != StateConfirming || linkHash == "" ||
			!equalHex(d.linkHash(docID, token), linkHash) || !time.Now().Before(expires.Time) {
			return errLinkInvalid
		}
		proof, err := json.Marshal(d.linkProof(docID, linkHash))
		if err != nil {
			return err
		}
		doc[FieldConfirmLink] = proof
		_, err = d.opts.DB.Put(ctx, docID, doc)
		if couch.IsConflict(err) {
			continue
		}
		return err
	}
	return linkError("document kept changing")
}
