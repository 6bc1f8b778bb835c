package supervisor

import (
	"hash/fnv"
	"path"
)

// Matches reports whether the supervisor watches database name: it
// matches a pattern and falls in this daemon's shard.
func (s *Supervisor) Matches(name string) bool {
	return MatchDatabase(s.opts.Patterns, name) && (s.opts.Shards <= 1 || ShardOf(name, s.opts.Shards) == s.opts.Shard)
}

// ShardOf is the shard of database name among shards: FNV-1a of the name
// modulo shards, the same on every daemon and every start.
func ShardOf(name string, shards int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	return int(h.Sum32() % uint32(shards))
}

// MatchDatabase reports whether database name matches one of the
// path.Match globs; system databases (starting with "_") never do.
func MatchDatabase(patterns []string, name string) bool {
	if name == "" || name[0] == '_' {
		return false
	}
	for _, p := range patterns {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}
