package workflow

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"
)

// Mode says whether a handler may run more than once for the same state.
type Mode int

const (
	// Safe handlers are idempotent: they may run twice, even on two workers at
	// once. Their result is written with _rev; a 409 drops it, because someone
	// else moved the document first and the feed will bring the new version.
	Safe Mode = iota + 1
	// Unsafe handlers have side effects that must not be doubled (an email).
	// The engine first claims the document through MVCC; only the worker whose
	// claim write is accepted runs the handler.
	Unsafe
)

func (m Mode) String() string {
	switch m {
	case Safe:
		return "safe"
	case Unsafe:
		return "unsafe"
	default:
		return fmt.Sprintf("Mode(%d)", int(m))
	}
}

// ExpiryPolicy says what happens to an unsafe claim whose lease ran out: the
// worker that held it crashed or stalled, so whether the side effect happened
// is unknown.
type ExpiryPolicy int

const (
	// RetryExpired takes the claim over and runs the handler again with the
	// same idempotency key (Claim.Key) and Claim.Takeover set, so the handler
	// can make the repeat recognisable (e.g. the same email Message-ID). The
	// takeover counts as a failed attempt.
	RetryExpired ExpiryPolicy = iota
	// FailExpired moves the document to the error state with a reason instead;
	// an operator decides whether to re-drive it.
	FailExpired
)

func (p ExpiryPolicy) String() string {
	if p == FailExpired {
		return "fail"
	}
	return "retry"
}

// Handler handles documents in one (type, state).
//
// It must not save the document itself: it returns a Result and the engine
// writes it, with the compare-and-swap and retry rules of the handler's Mode.
// Returning an error retries with backoff; wrap it with Terminal to go to the
// error state at once.
type Handler interface {
	Handle(ctx context.Context, doc *Doc) (Result, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, doc *Doc) (Result, error)

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, doc *Doc) (Result, error) { return f(ctx, doc) }

var _ Handler = HandlerFunc(nil)

// Spec registers one handler. Zero values take the engine's defaults.
type Spec struct {
	Type    string
	State   string
	Mode    Mode
	Handler Handler

	// Timeout bounds one run of the handler (default Options.HandlerTimeout).
	Timeout time.Duration
	// Lease is how long an unsafe claim is held before others may take it
	// over (default Options.Lease). It must exceed Timeout, with room for the
	// result write.
	Lease time.Duration
	// MaxAttempts is how many failed runs in this state send the document to
	// ErrorState (default Options.MaxAttempts).
	MaxAttempts int
	// Backoff returns the delay before retry number attempt (1-based). The
	// default is exponential from Options.RetryBase to Options.RetryMax with
	// jitter.
	Backoff func(attempt int) time.Duration
	// OnExpired is the policy for unsafe claims whose lease ran out.
	OnExpired ExpiryPolicy
	// ErrorState is the state a failed document moves to (default "error").
	ErrorState string
	// MaxFields are counters the handler keeps in the document's own
	// fields (wrong codes, mails sent) that must never go down. When the
	// engine resolves a stored conflict (a cluster, or a replicated side
	// branch) it keeps one branch; these fields take their highest number
	// over all branches, as the engine's own attempt counts do.
	MaxFields []string
}

// DefaultErrorState is where failed documents go unless a Spec says otherwise.
const DefaultErrorState = "error"

// Registry maps (type, state) to handlers. Build it before the engine starts;
// it is not safe to register while an engine runs.
type Registry struct {
	specs map[key]Spec
}

type key struct{ typ, state string }

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{specs: make(map[key]Spec)}
}

// Register adds a handler. Registering the same (type, state) twice is an
// error, as is a spec without type, state, mode or handler.
func (r *Registry) Register(s Spec) error {
	var errs []error
	if err := checkName("type", s.Type); err != nil {
		errs = append(errs, err)
	}
	if err := checkName("state", s.State); err != nil {
		errs = append(errs, err)
	}
	if s.Mode != Safe && s.Mode != Unsafe {
		errs = append(errs, fmt.Errorf("mode must be Safe or Unsafe, got %v", s.Mode))
	}
	if s.Handler == nil {
		errs = append(errs, errors.New("handler is nil"))
	}
	if s.Timeout < 0 || s.Lease < 0 || s.MaxAttempts < 0 {
		errs = append(errs, errors.New("timeout, lease and max attempts must not be negative"))
	}
	if s.Lease > 0 && s.Timeout > 0 && s.Lease <= s.Timeout {
		errs = append(errs, fmt.Errorf("lease %v must exceed timeout %v", s.Lease, s.Timeout))
	}
	if s.ErrorState != "" {
		if err := checkName("error state", s.ErrorState); err != nil {
			errs = append(errs, err)
		}
		if s.ErrorState == s.State {
			errs = append(errs, errors.New("error state must differ from the handled state"))
		}
	}
	if s.OnExpired != RetryExpired && s.OnExpired != FailExpired {
		errs = append(errs, fmt.Errorf("unknown expiry policy %d", s.OnExpired))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("register %s/%s: %w", s.Type, s.State, err)
	}
	k := key{s.Type, s.State}
	if _, dup := r.specs[k]; dup {
		return fmt.Errorf("register %s/%s: a handler is already registered for this type and state", s.Type, s.State)
	}
	r.specs[k] = s
	return nil
}

// MustRegister is Register that panics on error, for registrations written
// in code whose failure is a programming error.
func (r *Registry) MustRegister(s Spec) {
	if err := r.Register(s); err != nil {
		panic(err)
	}
}

// Lookup returns the spec for (typ, state).
func (r *Registry) Lookup(typ, state string) (Spec, bool) {
	s, ok := r.specs[key{typ, state}]
	return s, ok
}

// HasType reports whether any handler is registered for typ. Documents of such
// a type are the engine's business: malformed ones get a recorded reason.
func (r *Registry) HasType(typ string) bool {
	for k := range r.specs {
		if k.typ == typ {
			return true
		}
	}
	return false
}

// Specs lists the registrations sorted by type then state.
func (r *Registry) Specs() []Spec {
	out := make([]Spec, 0, len(r.specs))
	for _, s := range r.specs {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Type != out[j].Type {
			return out[i].Type < out[j].Type
		}
		return out[i].State < out[j].State
	})
	return out
}

// Len returns the number of registrations.
func (r *Registry) Len() int { return len(r.specs) }

const maxNameLen = 128

func checkName(what, v string) error {
	if v == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(v) > maxNameLen {
		return fmt.Errorf("%s is longer than %d bytes", what, maxNameLen)
	}
	for _, c := range v {
		if c < 0x20 || c == 0x7f {
			return fmt.Errorf("%s %q contains a control character", what, v)
		}
	}
	return nil
}
