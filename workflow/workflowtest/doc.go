// Package workflowtest helps test handlers against a real engine: start an
// engine in the background of a test (stopped when the test ends), poll
// for a condition, and use engine options whose intervals suit tests.
//
//	func TestOrderAccepted(t *testing.T) {
//		db := ... // a real CouchDB database
//		reg := workflow.NewRegistry()
//		reg.MustRegister(workflow.Spec{Type: "order", State: "new", Mode: workflow.Safe, Handler: accept})
//		workflowtest.Start(t, db, reg, workflowtest.Options(t))
//		workflowtest.Eventually(t, 10*time.Second, "order accepted", func() (bool, string) {
//			... read the document; return state == "accepted", state
//		})
//	}
package workflowtest
