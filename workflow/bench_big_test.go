package workflow_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docstate/docstate/internal/couchtest"
	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/workflowtest"
)

// BenchmarkBigDocuments writes 100 documents of 8 MB at once into a database
// an engine follows, with a handler that refuses documents over 16 KiB (as
// the device handlers do), by BENCH_BIG_WRITERS (default 8) writers at once
// (PouchDB Server runs out of memory taking 100 such bodies at once), and reports the process's peak resident set
// during the burst. The engine runs in the test process; the documents are
// streamed to the server from a generator, so the writers hold a few KiB
// each and the peak is the engine's. Run it once:
//
//	go test -run '^$' -bench BigDocuments -benchtime 1x ./workflow/
//
// and read peak-rss-MiB (VmHWM, reset before the burst), rss-delta-MiB
// (that minus the resident set just before the burst) and peak-heap-MiB
// (live heap objects, sampled every 5ms). BENCH_BIG_DOCS and BENCH_BIG_MB
// change the count and size.
func BenchmarkBigDocuments(b *testing.B) {
	n, size := envInt(b, "BENCH_BIG_DOCS", 100), envInt(b, "BENCH_BIG_MB", 8)<<20
	writers := envInt(b, "BENCH_BIG_WRITERS", 8)
	for range b.N {
		bigDocumentsOnce(b, n, size, writers)
	}
}

func bigDocumentsOnce(b *testing.B, n, size, writers int) {
	b.StopTimer()
	opts := couchtest.Options(b)
	client := couchtest.Client(b)
	db := couchtest.NewDB(b, client)
	reg := workflow.NewRegistry()
	reg.MustRegister(workflow.Spec{Type: "blob", State: "new", Mode: workflow.Safe,
		Handler: workflow.HandlerFunc(func(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
			if len(doc.Raw()) > 16<<10 {
				return workflow.Result{}, workflow.Terminal(fmt.Errorf("document is %d bytes, more than 16 KiB", len(doc.Raw())))
			}
			return workflow.Transition("done"), nil
		})})
	eo := workflowtest.Options(b)
	eo.CheckpointInterval = 5 * time.Second
	eng := workflowtest.Start(b, db, reg, eo)
	// A small document first: the engine is following the feed (PouchDB
	// Server holds a longpoll at the head of a quiet database unanswered).
	putDocs(b, db, "warm", 1, "blob", "new", nil)
	workflowtest.Eventually(b, time.Minute, "small document handled", func() (bool, string) {
		s := eng.Stats()
		return s.Transitions == 1 && s.Pending == 0, fmt.Sprintf("%+v", s)
	})
	received := eng.Stats().ChangesReceived

	runtime.GC()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Logf("cannot reset the peak resident set (%v); peak-rss-MiB covers the whole process life", err)
	}
	before := procStatus(b, "VmRSS")
	sampler := startHeapSampler()
	b.StartTimer()

	var wg sync.WaitGroup
	errs := make(chan error, n)
	ids := make(chan string, n)
	for i := range n {
		ids <- fmt.Sprintf("big-%03d", i)
	}
	close(ids)
	for range writers {
		wg.Go(func() {
			for id := range ids {
				errs <- putStreamed(opts.URL, opts.Username, opts.Password, db.Name(), id, size)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	// Every document's change must have been received and settled: the
	// engine is idle with all of them behind its checkpoint.
	workflowtest.Eventually(b, 10*time.Minute, "all big documents settled", func() (bool, string) {
		s := eng.Stats()
		return s.ChangesReceived >= received+int64(n) && s.Pending == 0 && s.Queued == 0 && s.Inflight == 0, fmt.Sprintf("%+v", s)
	})
	b.StopTimer()
	peakHeap := sampler.stop()
	peak := procStatus(b, "VmHWM")
	b.ReportMetric(float64(peak)/(1<<20), "peak-rss-MiB")
	b.ReportMetric(float64(peak-before)/(1<<20), "rss-delta-MiB")
	b.ReportMetric(float64(peakHeap)/(1<<20), "peak-heap-MiB")
	s := eng.Stats()
	b.Logf("stats after the burst: %+v", s)
	eng.Stop(b)
	time.Sleep(300 * time.Millisecond) // see stop in bench_test.go
}

// putStreamed writes {"type":"blob","state":"new","pad":"xxx…"} of about
// size bytes without holding it: the body comes from a generator.
func putStreamed(base, user, password, dbName, id string, size int) error {
	head := `{"type":"blob","state":"new","pad":"`
	tail := `"}`
	pad := max(size-len(head)-len(tail), 0)
	body := io.MultiReader(strings.NewReader(head), io.LimitReader(repeatByte('x'), int64(pad)), strings.NewReader(tail))
	u := strings.TrimSuffix(base, "/") + "/" + url.PathEscape(dbName) + "/" + url.PathEscape(id)
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPut, u, body)
	if err != nil {
		return err
	}
	req.ContentLength = int64(len(head) + pad + len(tail))
	req.Header.Set("Content-Type", "application/json")
	req.SetBasicAuth(user, password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("put %s: %w", id, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("put %s: %s: %s", id, resp.Status, msg)
	}
	return nil
}

type repeatByte byte

func (r repeatByte) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// procStatus returns a "kB" field of /proc/self/status in bytes.
func procStatus(tb testing.TB, field string) int64 {
	tb.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		tb.Fatalf("read /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			tb.Fatalf("%s in /proc/self/status: %v", field, err)
		}
		return kb << 10
	}
	tb.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// heapSampler records the largest live heap seen.
type heapSampler struct {
	done chan struct{}
	wg   sync.WaitGroup
	peak uint64
}

func startHeapSampler() *heapSampler {
	s := &heapSampler{done: make(chan struct{})}
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	s.wg.Go(func() {
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			if sample[0].Value.Kind() == metrics.KindUint64 {
				s.peak = max(s.peak, sample[0].Value.Uint64())
			}
			select {
			case <-s.done:
				return
			case <-t.C:
			}
		}
	})
	return s
}

func (s *heapSampler) stop() uint64 {
	close(s.done)
	s.wg.Wait()
	return s.peak
}
