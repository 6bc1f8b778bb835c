package supervisor

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"time"

	"github.com/docstate/docstate/workflow"
)

// Ready reports whether discovery works: the last one succeeded within
// three intervals (plus the feed deadline's slack).
func (s *Supervisor) Ready() error {
	last := s.lastScan.Load()
	if last == 0 {
		return errors.New("databases not discovered yet")
	}
	if err := s.scanErr.Load(); err != nil {
		return fmt.Errorf("database discovery is failing: %w", *err)
	}
	if age, limit := time.Since(time.Unix(0, last)), 3*s.opts.DiscoveryInterval+30*time.Second; age > limit {
		return fmt.Errorf("no successful database discovery for %v", age.Round(time.Second))
	}
	return nil
}

// Stats describes the many-database mode now.
type Stats struct {
	Watched    int    // databases matching the patterns
	Open       int    // engines (feeds) running now
	MaxOpen    int64  // the most engines that ran at once
	Waiting    int    // databases with work waiting for a slot
	Scans      int64  // discoveries
	Started    int64  // engines started
	Stopped    int64  // engines stopped (idle, yielded or database gone)
	Discovery  string // DiscoveryAllDBs or DiscoveryDBUpdates; "" before Run decided
	LastSweep  time.Time
	EngineSums workflow.Stats // every engine's counters summed, stopped ones included
}

// SupervisorStats returns the supervisor's counters now.
func (s *Supervisor) SupervisorStats() Stats {
	s.mu.Lock()
	st := Stats{
		Watched: len(s.dbs), Open: len(s.running), Waiting: len(s.waiting),
		MaxOpen: s.maxRunning.Load(), Scans: s.scans.Load(), Started: s.started.Load(), Stopped: s.stopped.Load(),
		Discovery: s.Mode(), EngineSums: s.finished,
	}
	for _, r := range s.running {
		addStats(&st.EngineSums, r.eng.Stats())
	}
	s.mu.Unlock()
	// One budget for all: its gauge is not a sum.
	st.EngineSums.PendingBytes, st.EngineSums.PendingBytesPeak = s.budget.Stats()
	if t := s.lastScan.Load(); t != 0 {
		st.LastSweep = time.Unix(0, t)
	}
	return st
}

// Stats returns every engine's counters summed, stopped ones included, so
// metrics built for one engine describe the whole supervisor. Gauges
// (Inflight, Queued, Delayed, Pending) cover the running engines only.
func (s *Supervisor) Stats() workflow.Stats {
	st := s.SupervisorStats()
	return st.EngineSums
}

// addStats adds b's counters to a: every int64 field, so a counter added
// to workflow.Stats is summed without a list here to forget it in; times
// (CheckpointSaved, FeedContact) take the later. Gauges are added too: the
// caller sums running engines only into a fresh Stats for those to be
// right.
func addStats(a *workflow.Stats, b workflow.Stats) {
	av, bv := reflect.ValueOf(a).Elem(), reflect.ValueOf(b)
	for i := range av.NumField() {
		switch f := av.Field(i); v := bv.Field(i).Interface().(type) {
		case int64:
			f.SetInt(f.Int() + v)
		case time.Time:
			if v.After(f.Interface().(time.Time)) {
				f.Set(reflect.ValueOf(v))
			}
		}
		// Any other kind of field is left alone; TestAddStatsSumsEveryField
		// fails on one, so that it is decided how to sum it.
	}
}

// String names the watched databases' count, for logs.
func (s Stats) String() string {
	return strconv.Itoa(s.Watched) + " databases, " + strconv.Itoa(s.Open) + " open"
}
