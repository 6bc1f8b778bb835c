package devices

import (
	"bytes"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	texttemplate "text/template"
	"time"
)

// Template file names looked up by LoadTemplates.
const (
	SubjectFile = "subject.txt"
	TextFile    = "body.txt"
	HTMLFile    = "body.html"
)

// TemplateData is what the confirmation templates see. Every value is
// validated before rendering; the HTML template escapes them anyway.
type TemplateData struct {
	// Owner is the recipient address.
	Owner string
	// DeviceName is the name the device gave itself.
	DeviceName string
	// Code is the confirmation code to type on the device.
	Code string
	// Link is the confirmation page URL, "" when no base URL is configured.
	Link string
	// Expires is when the code stops working (UTC).
	Expires time.Time
	// ValidFor is the code's lifetime, rounded, e.g. "15m".
	ValidFor string
}

// Templates render the confirmation email: subject and text body with
// text/template, HTML body with html/template (contextual escaping).
type Templates struct {
	subject *texttemplate.Template
	text    *texttemplate.Template
	html    *htmltemplate.Template
}

const defaultSubject = `Confirm your new device`

const defaultText = `Hello,

a device called "{{.DeviceName}}" asks to be added to the account {{.Owner}}.

To confirm it, enter this code on the device:

    {{.Code}}
{{if .Link}}
or open this page and press "Confirm":

    {{.Link}}
{{end}}
The code is valid for {{.ValidFor}} (until {{.Expires.Format "2006-01-02 15:04 MST"}}).

If you did not add a device, ignore this message: nothing happens without the code.
`

const defaultHTML = `<!DOCTYPE html>
<html><body style="font-family: sans-serif">
<p>Hello,</p>
<p>a device called <strong>{{.DeviceName}}</strong> asks to be added to the account {{.Owner}}.</p>
<p>To confirm it, enter this code on the device:</p>
<p style="font-size: 1.6em; letter-spacing: 0.2em"><code>{{.Code}}</code></p>
{{if .Link}}<p>or <a href="{{.Link}}">open the confirmation page</a> and press "Confirm".</p>{{end}}
<p>The code is valid for {{.ValidFor}} (until {{.Expires.Format "2006-01-02 15:04 MST"}}).</p>
<p>If you did not add a device, ignore this message: nothing happens without the code.</p>
</body></html>
`

// DefaultTemplates returns the built-in templates.
func DefaultTemplates() (*Templates, error) {
	return parseTemplates(defaultSubject, defaultText, defaultHTML)
}

// LoadTemplates reads subject.txt, body.txt and body.html from dir. A file
// that does not exist keeps the built-in template, so an operator can
// override only the HTML, say. Templates are checked by rendering sample
// data, so a broken template fails at start, not at the first registration.
func LoadTemplates(dir string) (*Templates, error) {
	read := func(name, def string) (string, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			return def, nil
		}
		if err != nil {
			return "", fmt.Errorf("templates: %w", err)
		}
		return string(b), nil
	}
	subject, err := read(SubjectFile, defaultSubject)
	if err != nil {
		return nil, err
	}
	text, err := read(TextFile, defaultText)
	if err != nil {
		return nil, err
	}
	html, err := read(HTMLFile, defaultHTML)
	if err != nil {
		return nil, err
	}
	t, err := parseTemplates(subject, text, html)
	if err != nil {
		return nil, fmt.Errorf("templates in %s: %w", dir, err)
	}
	return t, nil
}

func parseTemplates(subject, text, html string) (*Templates, error) {
	opt := "missingkey=error"
	st, err := texttemplate.New(SubjectFile).Option(opt).Parse(strings.TrimSpace(subject))
	if err != nil {
		return nil, err
	}
	tt, err := texttemplate.New(TextFile).Option(opt).Parse(text)
	if err != nil {
		return nil, err
	}
	ht, err := htmltemplate.New(HTMLFile).Option(opt).Parse(html)
	if err != nil {
		return nil, err
	}
	t := &Templates{subject: st, text: tt, html: ht}
	sample := TemplateData{Owner: "user@example.com", DeviceName: "phone", Code: "12345678",
		Link: "https://example.com/devices/confirm?d=x&t=y", Expires: time.Now(), ValidFor: "15m"}
	if _, err := t.render(sample); err != nil {
		return nil, err
	}
	return t, nil
}

type rendered struct{ subject, text, html string }

func (t *Templates) render(data TemplateData) (rendered, error) {
	var s, x, h bytes.Buffer
	if err := t.subject.Execute(&s, data); err != nil {
		return rendered{}, fmt.Errorf("render subject: %w", err)
	}
	if err := t.text.Execute(&x, data); err != nil {
		return rendered{}, fmt.Errorf("render text body: %w", err)
	}
	if err := t.html.Execute(&h, data); err != nil {
		return rendered{}, fmt.Errorf("render html body: %w", err)
	}
	subject := strings.TrimSpace(s.String())
	// The subject is a header: a template that puts a line break into it
	// would let data inject headers.
	if strings.ContainsAny(subject, "\r\n") {
		return rendered{}, errors.New("rendered subject contains a line break")
	}
	return rendered{subject: subject, text: x.String(), html: h.String()}, nil
}
