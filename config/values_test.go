package config

import "testing"

func TestValuesListsEveryKeyAndRedactsSecrets(t *testing.T) {
	c := Default()
	c.CouchDB.Password = "hunter2"
	c.Engine.Workers = 3
	vals := c.Values()
	if len(vals) != len(Keys()) {
		t.Fatalf("%d values for %d keys", len(vals), len(Keys()))
	}
	got := map[string]string{}
	for _, kv := range vals {
		got[kv.Key] = kv.Value
	}
	if got["couchdb.password"] != redactedValue || got["engine.workers"] != "3" {
		t.Fatalf("values: %v", got)
	}
}
