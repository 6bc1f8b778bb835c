// Package workflow is docstate's engine: it follows a CouchDB database's
// changes feed and moves documents through state machines by running the
// handler registered for each document's (type, state).
//
// # The model
//
// The engine is level-triggered, like a Kubernetes controller. The feed is
// only a hint: it queues document ids (coalescing repeats, never running one
// id on two workers at once), and a worker decides from the document's
// current type and state. Replayed, duplicated or collapsed changes are
// therefore harmless. Every write is a compare-and-swap on _rev.
//
// Safe handlers are idempotent and may run more than once; a write that
// loses a race (409) is dropped and the document re-read. Unsafe handlers
// run at most once per claim: the engine first writes a claim (owner, lease
// expiry, attempt, idempotency key) into the document, and only the engine
// whose claim write was accepted runs the handler. A claim whose lease ran
// out is taken over or failed according to the handler's ExpiryPolicy.
//
// Handlers return a Result (a transition to a next state, or a stay, with
// field changes and an optional wake-up time) or an error. Errors are
// retried with per-document backoff recorded on the document; after
// MaxAttempts, or at once for an error wrapped by Terminal, the document
// moves to its error state with the reason.
//
// The checkpoint, in the database's _local/docstate-<name> document, only
// passes changes whose handling finished (a low-water mark), and treats seqs
// as opaque. At start, and then periodically, a scan queues documents that
// need attention without any feed event: every document in a registered
// state (at start), and every document whose due time (expired claim, due
// retry, wake-up) passed.
//
// # The document contract
//
// A workflow document has a string "type" and a string "state". The engine
// keeps its bookkeeping under the "docstate" field (see Meta); applications
// read it but should not write it. Handlers never save the triggering
// document: the engine writes their Result.
//
// # Registering a handler
//
//	reg := workflow.NewRegistry()
//	err := reg.Register(workflow.Spec{
//		Type: "order", State: "new", Mode: workflow.Safe,
//		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
//			return workflow.Transition("accepted").Set("accepted_by", "docstate"), nil
//		}),
//	})
//	eng, err := workflow.New(db, reg, workflow.Options{})
//	err = eng.Run(ctx) // until ctx ends, then drains
//
// # Around the engine
//
// Package workflow/workflowtest runs handlers without a server or against a
// test database; workflow/supervisor runs a registry over many databases
// (one engine per database with work); workflow/admin holds the operator
// tools (status, retry, replay).
package workflow
