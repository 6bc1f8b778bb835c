package couch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// A request whose context carries a body limit (WithBodyLimit) gets its
// response limited by the client's transport, below kivik, which would
// otherwise decode whatever the server sends in one piece:
//
//   - a document (GET) larger than the limit is not read: a Content-Length
//     over the limit fails at once, and a body without one fails once it
//     passes the limit. The error is a *TooLargeError;
//   - a _changes, _all_docs or _bulk_get response is passed through a
//     stream filter that replaces every row's document larger than the
//     limit with a small marker (see TooLargeMarker) while it streams, so a
//     feed with include_docs, or a fetch of many documents, holds at most
//     one limit's worth of a row's document at a time.
//
// The limit lives in the context rather than in the client because one
// client serves requests that must not be cut (an operator's read, a
// checkpoint) beside those that must.

type bodyLimitKey struct{}

// WithBodyLimit returns ctx asking the client to refuse document bodies
// larger than n bytes (n > 0).
func WithBodyLimit(ctx context.Context, n int64) context.Context {
	return context.WithValue(ctx, bodyLimitKey{}, n)
}

func bodyLimit(ctx context.Context) (int64, bool) {
	n, ok := ctx.Value(bodyLimitKey{}).(int64)
	return n, ok && n > 0
}

// TooLargeError is a document body refused under WithBodyLimit.
type TooLargeError struct {
	// Size is the body's size in bytes when the server said it (a
	// Content-Length), otherwise 0: the body was cut at the limit.
	Size  int64
	Limit int64
	// Rev is the document's revision from the response's ETag, if any.
	Rev string
}

func (e *TooLargeError) Error() string {
	if e.Size > 0 {
		return fmt.Sprintf("document is %d bytes, more than the limit of %d", e.Size, e.Limit)
	}
	return fmt.Sprintf("document is more than the limit of %d bytes", e.Limit)
}

// HTTPStatus makes the refusal a 413 for kivik.HTTPStatus: not transient,
// repeating the read changes nothing.
func (e *TooLargeError) HTTPStatus() int { return http.StatusRequestEntityTooLarge }

// AsTooLarge returns the *TooLargeError in err's chain, if any.
func AsTooLarge(err error) (*TooLargeError, bool) {
	var tl *TooLargeError
	ok := errors.As(err, &tl)
	return tl, ok
}

// limitTransport applies the body limit of a request's context.
type limitTransport struct {
	base http.RoundTripper
}

func (t *limitTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	limit, ok := bodyLimit(req.Context())
	resp, err := t.base.RoundTrip(req)
	if !ok || err != nil || resp.StatusCode != http.StatusOK || req.Method == http.MethodHead {
		// Error answers are small and kivik reads them whole anyway.
		return resp, err
	}
	// The escaped path: a document id ending in "/_changes" is sent
	// with its slash escaped, and must not be taken for a feed.
	if rowDepth, key, ok := rowsShape(req.URL.EscapedPath()); ok {
		resp.Body = newRowsFilter(resp.Body, limit, rowDepth, key)
		resp.ContentLength = -1
		resp.Header.Del("Content-Length")
		return resp, nil
	}
	tl := &TooLargeError{Size: resp.ContentLength, Limit: limit, Rev: revFromETag(resp.Header.Get("ETag"))}
	if resp.ContentLength > limit {
		// The body is not read: closing it drops the connection, which
		// costs a new one and spares reading megabytes to reuse it.
		_ = resp.Body.Close()
		resp.Body = failingBody{tl}
		return resp, nil
	}
	tl.Size = 0
	resp.Body = &limitedBody{rc: resp.Body, left: limit, err: tl}
	return resp, nil
}

// rowsShape tells where the documents are in the answer of a request for
// many: a _changes or _all_docs answer is an object whose array holds rows
// with the document under "doc" (depth 3); a _bulk_get answer holds
// results whose "docs" array holds {"ok": document} (depth 5).
func rowsShape(escapedPath string) (rowDepth int, key string, ok bool) {
	switch {
	case strings.HasSuffix(escapedPath, "/_changes"), strings.HasSuffix(escapedPath, "/_all_docs"):
		return 3, "doc", true
	case strings.HasSuffix(escapedPath, "/_bulk_get"):
		return 5, "ok", true
	}
	return 0, "", false
}

// revFromETag returns the revision CouchDB puts in a document's ETag, ""
// for any other ETag (PouchDB Server's are weak hashes of the body).
func revFromETag(etag string) string {
	rev, ok := strings.CutPrefix(etag, `"`)
	if !ok {
		return ""
	}
	rev, ok = strings.CutSuffix(rev, `"`)
	gen, hash, found := strings.Cut(rev, "-")
	if !ok || !found || hash == "" {
		return ""
	}
	if _, err := strconv.Atoi(gen); err != nil {
		return ""
	}
	return rev
}

// failingBody is the body of a response refused by its Content-Length.
type failingBody struct{ err error }

func (b failingBody) Read([]byte) (int, error) { return 0, b.err }
func (b failingBody) Close() error             { return nil }

// limitedBody fails once more than its limit was read.
type limitedBody struct {
	rc   io.ReadCloser
	left int64
	err  error
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, b.err
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return 0, b.err
	}
	return n, err
}

func (b *limitedBody) Close() error { return b.rc.Close() }

// TooLargeMarker is the key of the object the changes filter puts in place of
// a row's document over the limit: {"_docstate_too_large": <bytes>}. A
// document cannot have it: CouchDB refuses top-level fields starting with an
// underscore that it does not define.
const TooLargeMarker = "_docstate_too_large"

var markerPrefix = []byte(`{"` + TooLargeMarker + `":`)

// TooLargeSize reports whether doc is the changes filter's marker, and the
// size of the document it replaced.
func TooLargeSize(doc []byte) (int64, bool) {
	rest, ok := bytes.CutPrefix(doc, markerPrefix)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(string(bytes.TrimSuffix(rest, []byte("}"))), 10, 64)
	return n, err == nil
}

// changesFilter passes a _changes response (normal or longpoll: an object
// whose "results" array holds the rows) through unchanged, except that the
// value of a row's "doc" key is held back until it ends: up to the limit it
// is passed on as it was, past the limit it is dropped as it streams and the
// marker takes its place. Only JSON structure is tracked (nesting, strings,
// escapes), never values decoded. The same filter serves other answers of
// that kind, with the rows at another depth or the document under another
// key (rowsShape).
type changesFilter struct {
	src   io.ReadCloser
	limit int64
	// rowDepth is the nesting of the objects that hold a document under
	// docKey.
	rowDepth int
	docKey   string
	in       []byte
	out      []byte
	outAt    int
	err      error

	depth    int  // nesting outside a held document: 1 top object, 2 results, 3 a row (for _changes)
	inString bool // in a string outside a held document
	escape   bool
	// Row keys: at depth 3 a string where a key is expected is one; key
	// collects it (only "doc" matters, so a few bytes).
	wantKey   bool
	inKey     bool
	key       []byte
	keyIsDoc  bool // the last key was "doc" and its value has not started
	afterDoc  bool // ':' after the "doc" key was seen
	holding   bool // in a row's document
	held      []byte
	heldSize  int64
	heldDepth int
	heldStr   bool
	heldEsc   bool
}

func newChangesFilter(src io.ReadCloser, limit int64) *changesFilter {
	return newRowsFilter(src, limit, 3, "doc")
}

func newRowsFilter(src io.ReadCloser, limit int64, rowDepth int, docKey string) *changesFilter {
	return &changesFilter{src: src, limit: limit, rowDepth: rowDepth, docKey: docKey, in: make([]byte, 32<<10)}
}

func (f *changesFilter) Close() error { return f.src.Close() }

func (f *changesFilter) Read(p []byte) (int, error) {
	for f.outAt == len(f.out) {
		if f.err != nil {
			return 0, f.err
		}
		f.out, f.outAt = f.out[:0], 0
		n, err := f.src.Read(f.in)
		f.scan(f.in[:n])
		if err != nil {
			if err == io.EOF && (f.holding || f.depth > 0) {
				err = io.ErrUnexpectedEOF
			}
			f.err = err
		}
	}
	n := copy(p, f.out[f.outAt:])
	f.outAt += n
	return n, nil
}

// scan moves chunk to out, holding back row documents.
func (f *changesFilter) scan(chunk []byte) {
	start := 0 // first byte of chunk not yet copied to out
	for i := 0; i < len(chunk); i++ {
		c := chunk[i]
		if f.holding {
			f.hold(c)
			if !f.holding {
				start = i + 1
			}
			continue
		}
		if f.inString {
			switch {
			case f.escape:
				f.escape = false
			case c == '\\':
				f.escape = true
			case c == '"':
				f.inString = false
				if f.inKey {
					f.inKey = false
					f.keyIsDoc = string(f.key) == f.docKey
				}
				continue
			}
			if f.inKey && len(f.key) < 8 {
				f.key = append(f.key, c)
			}
			continue
		}
		if f.afterDoc && !isSpace(c) {
			f.afterDoc = false
			if c == '{' {
				f.out = append(f.out, chunk[start:i]...)
				f.holding, f.held, f.heldSize, f.heldDepth = true, f.held[:0], 0, 0
				f.hold(c)
				continue
			}
			// null, or something else a server might send: as it is.
		}
		switch c {
		case '"':
			f.inString = true
			if f.depth == f.rowDepth && f.wantKey {
				f.inKey, f.key, f.wantKey = true, f.key[:0], false
			}
		case '{', '[':
			f.depth++
			f.wantKey = c == '{' && f.depth == f.rowDepth
		case '}', ']':
			f.depth--
		case ',':
			f.wantKey = f.depth == f.rowDepth
		case ':':
			if f.depth == f.rowDepth && f.keyIsDoc {
				f.afterDoc = true
			}
			f.keyIsDoc = false
		}
	}
	if !f.holding {
		f.out = append(f.out, chunk[start:]...)
	}
}

// hold takes one byte of a row's document.
func (f *changesFilter) hold(c byte) {
	f.heldSize++
	if f.heldSize <= f.limit {
		f.held = append(f.held, c)
	} else if f.held != nil {
		f.held = nil // over the limit: drop what was held, count the rest
	}
	switch {
	case f.heldStr:
		switch {
		case f.heldEsc:
			f.heldEsc = false
		case c == '\\':
			f.heldEsc = true
		case c == '"':
			f.heldStr = false
		}
		return
	case c == '"':
		f.heldStr = true
	case c == '{', c == '[':
		f.heldDepth++
	case c == '}', c == ']':
		f.heldDepth--
	}
	if f.heldDepth > 0 {
		return
	}
	f.holding = false
	if f.heldSize <= f.limit {
		f.out = append(f.out, f.held...)
		return
	}
	f.out = append(f.out, markerPrefix...)
	f.out = strconv.AppendInt(f.out, f.heldSize, 10)
	f.out = append(f.out, '}')
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }
