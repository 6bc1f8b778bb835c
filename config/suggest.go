package config

import (
	"fmt"
	"strings"
)

// maxSuggestLen skips suggestions for absurdly long names, where edit
// distance would cost time and help nobody.
const maxSuggestLen = 100

// suggest returns ` (did you mean X?)` for the candidate within a small
// edit distance of name (a typo or a case slip), or "".
func suggest(name string, candidates []string) string {
	if best := closest(name, candidates); best != "" {
		return fmt.Sprintf(" (did you mean %s?)", best)
	}
	return ""
}

// suggestKey is suggest for dotted keys. Besides typos it catches a key
// put in the wrong section ("couchdb.workers", or "workers" at the top):
// if exactly one key has the same last segment, that is the suggestion.
func suggestKey(name string, keys []string) string {
	best := closest(name, keys)
	if best == "" {
		leaf := name[strings.LastIndexByte(name, '.')+1:]
		for _, k := range keys {
			if k[strings.LastIndexByte(k, '.')+1:] != leaf {
				continue
			}
			if best != "" {
				return "" // ambiguous
			}
			best = k
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// closest returns the candidate nearest to name if it is at most two edits
// away, preferring the earliest candidate on ties.
func closest(name string, candidates []string) string {
	if len(name) > maxSuggestLen {
		return ""
	}
	const maxDistance = 2
	best, bestDist := "", maxDistance+1
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(name), strings.ToLower(c)); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance over bytes; keys are ASCII.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
