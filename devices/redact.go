package devices

import (
	"context"
	"strings"

	"github.com/docstate/docstate/workflow"
)

// Placeholders that stand in for scrubbed addresses.
const (
	// RedactedOwner replaces the owner's address (and its local part).
	RedactedOwner = "<owner>"
	// RedactedAddress replaces anything else shaped like an address.
	RedactedAddress = "<address>"
)

// redacting wraps a device handler so that no error it returns carries the
// owner's address, on every path (first mail, resend, activation,
// revocation): the engine logs the handler's error and records its text in
// docstate.last_error and docstate.error.reason, which every reader of the
// control database sees and every replica keeps.
func (d *Devices) redacting(h workflow.HandlerFunc) workflow.HandlerFunc {
	return func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
		res, err := h(ctx, doc)
		if err != nil {
			// The raw field, valid or not: an owner that failed validation
			// may still be someone's address.
			var owner string
			if _, ferr := doc.Field(FieldOwner, &owner); ferr != nil {
				owner = ""
			}
			err = redactor{owner: owner, keep: []string{d.opts.From}}.err(err)
		}
		return res, err
	}
}

// redactor scrubs an owner's address from text bound for logs, metrics and
// recorded reasons (docstate.error.reason, docstate.last_error): go-mail's
// error text ends in "affected recipient(s): <address>", and SMTP replies
// often echo the address ("550 5.1.1 <a@b>: Recipient address rejected").
//
// It replaces, in this order: the owner's address in any letter case; any
// other address-shaped text except the sender (keep) and docstate's own
// Message-IDs; and the owner's local part as a whole word when it is at
// least 3 characters (a reply may echo only that). Over-scrubbing only
// costs some diagnostic text; under-scrubbing leaks personal data into
// every log and every replicated copy of the document.
type redactor struct {
	owner string
	keep  []string // addresses left as they are, compared without case
}

// text returns s with the addresses scrubbed.
func (r redactor) text(s string) string {
	if r.owner != "" {
		s = replaceFold(s, r.owner, RedactedOwner)
	}
	s = replaceAddresses(s, func(a string) string {
		for _, k := range r.keep {
			if k != "" && strings.EqualFold(a, k) {
				return a
			}
		}
		if local, _, _ := strings.Cut(a, "@"); isMessageIDLocal(local) {
			return a
		}
		return RedactedAddress
	})
	if at := strings.LastIndexByte(r.owner, '@'); at >= 3 {
		s = replaceWordFold(s, r.owner[:at], RedactedOwner)
	}
	return s
}

// err returns err with its text scrubbed and its chain intact, so that
// errors.Is, errors.As and workflow.IsTerminal see what they saw before.
// nil stays nil; an error whose text needs no change is returned as is.
func (r redactor) err(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := r.text(msg)
	if clean == msg {
		return err
	}
	return &redactedError{msg: clean, err: err}
}

// redactedError shows scrubbed text but unwraps to the original error.
// The original text stays reachable through Unwrap, so nothing may log
// an unwrapped error of a send: the engine logs and records Error() of the
// handler's error, which is this one.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// replaceFold replaces every occurrence of old in s, compared without
// ASCII case, with repl.
func replaceFold(s, old, repl string) string {
	if old == "" {
		return s
	}
	ls, lo := strings.ToLower(s), strings.ToLower(old)
	if len(ls) != len(s) {
		// Lower-casing changed byte offsets (non-ASCII): fall back to an
		// exact match rather than cut at wrong positions.
		return strings.ReplaceAll(s, old, repl)
	}
	var b strings.Builder
	for {
		i := strings.Index(ls, lo)
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i])
		b.WriteString(repl)
		s, ls = s[i+len(old):], ls[i+len(old):]
	}
}

// replaceWordFold is replaceFold for whole words only: the match must not
// touch another local-part character on either side.
func replaceWordFold(s, word, repl string) string {
	ls, lw := strings.ToLower(s), strings.ToLower(word)
	if len(ls) != len(s) || lw == "" {
		return s
	}
	var b strings.Builder
	from := 0
	for {
		i := strings.Index(ls[from:], lw)
		if i < 0 {
			b.WriteString(s[from:])
			return b.String()
		}
		i += from
		end := i + len(lw)
		placeholder := i > 0 && end < len(s) && s[i-1] == '<' && s[end] == '>' &&
			(s[i-1:end+1] == RedactedOwner || s[i-1:end+1] == RedactedAddress)
		if !placeholder && (i == 0 || !isAtomChar(s[i-1])) && (end == len(s) || !isAtomChar(s[end])) {
			b.WriteString(s[from:i])
			b.WriteString(repl)
		} else {
			b.WriteString(s[from:end])
		}
		from = end
	}
}

// isAtomChar reports whether c may appear in a dot-atom local part.
func isAtomChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte(".!#$%&'*+/=?^_`{|}~-", c) >= 0
}

// replaceAddresses replaces each address-shaped run in s, a dot-atom local
// part, "@" and a domain of letters, digits, dots and hyphens, with what
// repl returns for it. SMTP replies echo addresses in many forms ("<a@b>",
// "a@b:", "for a@b"), so the match is on the address itself, whatever
// surrounds it.
func replaceAddresses(s string, repl func(string) string) string {
	var b strings.Builder
	done := 0 // s[:done] is written to b
	for i := 0; i < len(s); i++ {
		if s[i] != '@' {
			continue
		}
		start := i
		for start > done && isAtomChar(s[start-1]) {
			start--
		}
		end := i + 1
		for end < len(s) && isDomainChar(s[end]) {
			end++
		}
		for end > i+1 && (s[end-1] == '.' || s[end-1] == '-') {
			end-- // a full stop or dash after the address is not part of it
		}
		if start == i || end == i+1 {
			continue
		}
		b.WriteString(s[done:start])
		b.WriteString(repl(s[start:end]))
		done, i = end, end-1
	}
	if done == 0 {
		return s
	}
	b.WriteString(s[done:])
	return b.String()
}

func isDomainChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-'
}

// isMessageIDLocal reports whether local is the local part of a Message-ID
// docstate makes (32 lower-case hex digits): those name no one, and logs
// need them to trace a mail.
func isMessageIDLocal(local string) bool {
	if len(local) != 32 {
		return false
	}
	for i := range len(local) {
		if c := local[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
