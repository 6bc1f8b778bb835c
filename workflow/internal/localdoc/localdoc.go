// Package localdoc names the _local documents docstate keeps in a workflow
// database. _local documents do not replicate and are not in the changes
// feed, so writing one never wakes an engine. The names are a stored
// contract: the engine, the supervisor and the operator tools read the
// same documents.
package localdoc

// CheckpointID is where engine name keeps its checkpoint.
func CheckpointID(name string) string { return "_local/docstate-" + name }

// DueID is where a supervisor keeps the earliest due time of engine name's
// database while no engine runs there.
func DueID(name string) string { return CheckpointID(name) + "-due" }
