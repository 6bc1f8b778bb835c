package workflow

import "testing"

func TestSeqRewound(t *testing.T) {
	for _, tc := range []struct {
		since, seq string
		want       bool
	}{
		{"120", "121", false},
		{"120", "7", true},
		{"120-g1AAAAA", "121-g1BBBB", false},
		{"120-g1AAAAA", "98-g1CCCC", true}, // a shard copy lost (apache/couchdb#3788)
		{"now", "5", false},
		{"0", "1-g1", false},
		{"5-x", "opaque", false},
	} {
		if got := seqRewound(tc.since, tc.seq); got != tc.want {
			t.Errorf("seqRewound(%q, %q) = %v, want %v", tc.since, tc.seq, got, tc.want)
		}
	}
}
