package supervisor

import (
	"reflect"
	"testing"
	"time"

	"github.com/docstate/docstate/workflow"
)

// TestAddStatsSumsEveryField fills every field of an engine's Stats and
// checks that the sum of two holds each counter twice and the later time:
// a field added to workflow.Stats of a kind addStats does not sum fails
// here, not silently in the many-database metrics.
func TestAddStatsSumsEveryField(t *testing.T) {
	early, late := time.Unix(100, 0), time.Unix(200, 0)
	fill := func(n int64, at time.Time) workflow.Stats {
		var st workflow.Stats
		v := reflect.ValueOf(&st).Elem()
		for i := range v.NumField() {
			switch f := v.Field(i); f.Interface().(type) {
			case int64:
				f.SetInt(n)
			case time.Time:
				f.Set(reflect.ValueOf(at))
			default:
				t.Fatalf("workflow.Stats field %s is a %s: addStats does not sum it", v.Type().Field(i).Name, f.Type())
			}
		}
		return st
	}
	var sum workflow.Stats
	addStats(&sum, fill(1, late))
	addStats(&sum, fill(2, early))
	v := reflect.ValueOf(sum)
	for i := range v.NumField() {
		name := v.Type().Field(i).Name
		switch got := v.Field(i).Interface().(type) {
		case int64:
			if got != 3 {
				t.Errorf("%s summed to %d, want 3", name, got)
			}
		case time.Time:
			if !got.Equal(late) {
				t.Errorf("%s is %v, want the later %v", name, got, late)
			}
		}
	}
}
