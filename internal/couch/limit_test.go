package couch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"
)

func TestChangesFilterReplacesLargeDocs(t *testing.T) {
	small := `{"_id":"a","_rev":"1-x","doc":{"doc":"}{\"\\"},"s":"]\"doc\":{"}`
	big := `{"_id":"b","_rev":"2-y","pad":"` + strings.Repeat(`x\"{[`, 100) + `"}`
	feed := `{"results":[` +
		`{"seq":1,"id":"a","changes":[{"rev":"1-x"}],"doc":` + small + `},` +
		`{"id":"b","changes":[{"rev":"2-y"}],"doc" : ` + big + `,"seq":2},` +
		`{"seq":3,"id":"c","deleted":true,"changes":[{"rev":"3-z"}],"doc":null},` +
		"{\"seq\":4,\"id\":\"d\",\"changes\":[{\"rev\":\"1-w\"}],\n\"doc\":\n" + small + `}` +
		`],"last_seq":4,"pending":0}`
	limit := int64(len(small))
	for name, wrap := range map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"halves":   iotest.HalfReader,
	} {
		t.Run(name, func(t *testing.T) {
			f := newChangesFilter(io.NopCloser(wrap(strings.NewReader(feed))), limit)
			out, err := io.ReadAll(f)
			if err != nil {
				t.Fatal(err)
			}
			var got struct {
				Results []struct {
					ID  string          `json:"id"`
					Doc json.RawMessage `json:"doc"`
				} `json:"results"`
				LastSeq int `json:"last_seq"`
			}
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("filtered feed is not JSON: %v\n%s", err, out)
			}
			want := []string{small, fmt.Sprintf(`{"%s":%d}`, TooLargeMarker, len(big)), "null", small}
			if len(got.Results) != len(want) || got.LastSeq != 4 {
				t.Fatalf("got %d rows, last_seq %d:\n%s", len(got.Results), got.LastSeq, out)
			}
			for i, r := range got.Results {
				if string(r.Doc) != want[i] {
					t.Errorf("row %s: doc %s, want %s", r.ID, r.Doc, want[i])
				}
			}
			if n, ok := TooLargeSize(got.Results[1].Doc); !ok || n != int64(len(big)) {
				t.Errorf("TooLargeSize(marker) = %d, %v", n, ok)
			}
			if _, ok := TooLargeSize([]byte(small)); ok {
				t.Error("a document taken for the marker")
			}
		})
	}
}

func TestRevFromETag(t *testing.T) {
	for etag, want := range map[string]string{
		`"3-abc"`:               "3-abc",
		`W/"2066-8Xa+y2/QXiDL"`: "",
		`"abc"`:                 "",
		`"x-abc"`:               "",
		``:                      "",
	} {
		if got := revFromETag(etag); got != want {
			t.Errorf("revFromETag(%s) = %q, want %q", etag, got, want)
		}
	}
}

func TestChangesFilterCutFeedIsAnError(t *testing.T) {
	f := newChangesFilter(io.NopCloser(strings.NewReader(`{"results":[{"id":"a","doc":{"x":"`)), 1000)
	if _, err := io.ReadAll(f); err != io.ErrUnexpectedEOF {
		t.Fatalf("err = %v, want unexpected EOF", err)
	}
}

func TestBodyLimitRefusesLargeDocuments(t *testing.T) {
	body := `{"_id":"d","_rev":"1-a","pad":"` + strings.Repeat("x", 1000) + `"}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"1-a"`)
		if r.URL.Query().Has("chunked") {
			w.(http.Flusher).Flush() // no Content-Length
		} else {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		}
		_, _ = io.WriteString(w, body)
	}))
	defer srv.Close()
	client := &http.Client{Transport: &limitTransport{base: http.DefaultTransport}}
	read := func(limit int64, query string) ([]byte, error) {
		ctx := context.Background()
		if limit > 0 {
			ctx = WithBodyLimit(ctx, limit)
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/db/d"+query, nil)
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		return io.ReadAll(resp.Body)
	}
	for _, q := range []string{"", "?chunked=1"} {
		if got, err := read(0, q); err != nil || !bytes.Equal(got, []byte(body)) {
			t.Errorf("%q without a limit: %d bytes, %v", q, len(got), err)
		}
		if got, err := read(int64(len(body)), q); err != nil || len(got) != len(body) {
			t.Errorf("%q at the limit: %d bytes, %v", q, len(got), err)
		}
		_, err := read(100, q)
		tl, ok := AsTooLarge(err)
		if !ok || tl.Rev != "1-a" || tl.Limit != 100 {
			t.Fatalf("%q over the limit: %v", q, err)
		}
		if q == "" && tl.Size != int64(len(body)) {
			t.Errorf("size %d, want %d from Content-Length", tl.Size, len(body))
		}
		if IsTransient(err) {
			t.Error("a refusal taken for transient")
		}
	}
	// A document whose id ends in "/_changes" is a document, not a feed.
	req, _ := http.NewRequestWithContext(WithBodyLimit(context.Background(), 100), http.MethodGet, srv.URL+"/db/x%2F_changes", nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("document x/_changes over the limit read as a feed")
	}
}

// Answers that fetch many documents at once are cut like the feed: an
// _all_docs answer keeps its documents under each row's "doc", a _bulk_get
// answer under "ok" in each result's "docs".
func TestRowsFilterCutsAllDocsAndBulkGet(t *testing.T) {
	small := `{"_id":"a","_rev":"1-x","ok":{"doc":"}{\"\\"}}`
	big := `{"_id":"b","_rev":"2-y","pad":"` + strings.Repeat(`x\"{[`, 100) + `"}`
	marker := fmt.Sprintf(`{"%s":%d}`, TooLargeMarker, len(big))
	limit := int64(len(small))
	for _, c := range []struct{ path, in, want string }{
		{"/db/_all_docs",
			`{"total_rows":3,"offset":0,"rows":[{"id":"a","key":"a","value":{"rev":"1-x"},"doc":` + small + `},` +
				`{"id":"b","key":"b","value":{"rev":"2-y"},"doc":` + big + `},{"key":"c","error":"not_found"}]}`,
			`{"total_rows":3,"offset":0,"rows":[{"id":"a","key":"a","value":{"rev":"1-x"},"doc":` + small + `},` +
				`{"id":"b","key":"b","value":{"rev":"2-y"},"doc":` + marker + `},{"key":"c","error":"not_found"}]}`},
		{"/db/_bulk_get",
			`{"results":[{"id":"a","docs":[{"ok":` + small + `}]},{"id":"b","docs":[{"ok":` + big + `}]},` +
				`{"id":"c","docs":[{"error":{"id":"c","error":"not_found","reason":"missing"}}]}]}`,
			`{"results":[{"id":"a","docs":[{"ok":` + small + `}]},{"id":"b","docs":[{"ok":` + marker + `}]},` +
				`{"id":"c","docs":[{"error":{"id":"c","error":"not_found","reason":"missing"}}]}]}`},
	} {
		depth, key, ok := rowsShape(c.path)
		if !ok {
			t.Fatalf("%s: not filtered", c.path)
		}
		out, err := io.ReadAll(newRowsFilter(io.NopCloser(iotest.HalfReader(strings.NewReader(c.in))), limit, depth, key))
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.path, out, c.want)
		}
	}
	if _, _, ok := rowsShape("/db/doc%2F_changes"); ok {
		t.Error("a document id taken for a feed")
	}
}
