// Package testproc starts the helper processes of tests (test servers) so
// that they cannot outlive the test binary and a kill reaches their
// children too.
package testproc
