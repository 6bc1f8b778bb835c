package workflow

import (
	"testing"
	"time"
)

// When claims wait long for their slots (writes, not handlers, are the
// limit), the bound on claims ahead falls, never below the slots, at most
// once per twentieth of a lease; short waits let it grow back to maxAhead.
func TestAheadBoundFollowsSlotWaits(t *testing.T) {
	const lease = 20 * time.Second // a twentieth: 1s
	g := newAheadGate(4, 64)
	g.observe(time.Millisecond) // fast handlers: the pace allows maxAhead
	if got := g.limit(lease); got != 64 {
		t.Fatalf("limit before any long wait = %d, want 64", got)
	}
	g.observeWait(2*time.Second, lease)
	if got := g.limit(lease); got != 48 {
		t.Fatalf("limit after one long wait = %d, want 48", got)
	}
	// A second long wait within the same second does not cut again: the
	// waits already under way were all caused by the old bound.
	g.observeWait(2*time.Second, lease)
	if got := g.limit(lease); got != 48 {
		t.Fatalf("limit after a second long wait at once = %d, want 48", got)
	}
	for range 20 {
		g.cut = time.Time{} // as if each wait came a second after the last cut
		g.observeWait(2*time.Second, lease)
	}
	if got := g.limit(lease); got != 4 {
		t.Fatalf("limit after many long waits = %d, want the 4 slots", got)
	}
	wake := g.wake
	g.observeWait(10*time.Millisecond, lease)
	if got := g.limit(lease); got != 5 {
		t.Fatalf("limit after a short wait = %d, want 5", got)
	}
	select {
	case <-wake:
	default:
		t.Fatal("a grown bound did not wake the claims waiting to go ahead")
	}
	for range 100 {
		g.observeWait(0, lease)
	}
	if got := g.limit(lease); got != 64 {
		t.Fatalf("limit after many short waits = %d, want 64", got)
	}
}
