package channels

import (
	"context"

	"github.com/docstate/docstate/workflow"
)

// HandleReady runs the ready handler directly, so that a test can
// interleave two daemons' steps on one channel document.
func (c *Channels) HandleReady(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	return c.handleReady(ctx, doc)
}

// HandleDeleting runs the deleting handler directly.
func (c *Channels) HandleDeleting(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	return c.handleDeleting(ctx, doc)
}

// SetBeforeSubscriptionWrites sets the hook a reconcile runs just before it
// writes subscriptions.
func (c *Channels) SetBeforeSubscriptionWrites(f func()) { c.beforeSubscriptionWrites = f }

// SchedulerState reads a seed's state from the scheduler at
// Replicator.URL.
func (c *Channels) SchedulerState(ctx context.Context, id string) (state, reason string, ok bool, err error) {
	s, ok, err := c.schedulerState(ctx, id)
	return s.State, s.Reason, ok, err
}
