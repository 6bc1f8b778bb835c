// Package retry holds the backoff the engine and the supervisor wait with
// between failed attempts.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is exponential from base, capped at max, with "equal jitter":
// half the delay is fixed and half random, so retries of many documents
// that failed together spread out but never come sooner than half the step.
func Backoff(attempt int, base, max time.Duration) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := base
	for i := 1; i < attempt && d < max; i++ {
		d *= 2
	}
	if d > max || d <= 0 {
		d = max
	}
	half := d / 2
	if half <= 0 {
		return d
	}
	return half + rand.N(half+1)
}

// Sleep waits d or until ctx ends; it reports whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
