package channels

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/dbname"
)

// Seeding a channel from a template database: where the server should
// replicate, the daemon does not copy documents itself. It owns one
// _replicator document per seeded channel, with a stable id, and reads its
// state back onto the channel document.

const (
	// FieldTemplate names, on a create request and its channel document,
	// the configured template the channel is seeded from.
	FieldTemplate = "template"
	// FieldSeed is the seed's state on the channel document: state
	// (pending, running, completed, crashing, failed) and reason.
	FieldSeed = "seed"

	// SeedIDPrefix starts the id of a channel's seed replication in
	// _replicator, followed by the channel's database.
	SeedIDPrefix = "docstate-seed-"

	SeedPending   = "pending"
	SeedRunning   = "running"
	SeedCompleted = "completed"
	SeedCrashing  = "crashing"
	SeedFailed    = "failed"

	replicatorDB = "_replicator"
	// seedRecheck is how soon a seed still under way is looked at again.
	seedRecheck = 2 * time.Second
)

// Replicator is how the server reaches itself for the replications the
// daemon asks of it: a server admin's URL and credentials (the daemon's own,
// usually). They are written into the _replicator documents, which on
// CouchDB 3 only server admins and the document's owner read whole.
type Replicator struct {
	URL      string
	Username string
	Password string
}

// seed is a channel's seed state as recorded on its document.
type seed struct {
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
}

// endpoint is database's URL on the server, with the credentials.
func (r Replicator) endpoint(database string) string {
	u, err := url.Parse(strings.TrimRight(r.URL, "/"))
	if err != nil {
		return ""
	}
	if r.Username != "" {
		u.User = url.UserPassword(r.Username, r.Password)
	}
	return u.String() + "/" + url.PathEscape(database)
}

// ensureSeed makes sure the _replicator document that copies template
// into database exists, and returns its state. The scheduler's view
// (/_scheduler/docs, CouchDB 2+) is preferred; where the server has none
// (PouchDB Server) the document's own _replication_state is read.
func (c *Channels) ensureSeed(ctx context.Context, database, template string) (seed, error) {
	rep := c.opts.Client.DB(replicatorDB)
	id := SeedIDPrefix + database
	var cur struct {
		State  string `json:"_replication_state"`
		Reason string `json:"_replication_state_reason"`
	}
	err := rep.Get(ctx, id).ScanDoc(&cur)
	switch {
	case couch.IsNotFound(err):
		// A missing template is a failure, not an empty seed: PouchDB
		// would even create the source it replicates from.
		if ok, err := c.opts.Client.DBExists(ctx, template); err != nil {
			return seed{}, fmt.Errorf("check template database %s: %w", template, err)
		} else if !ok {
			return seed{State: SeedFailed, Reason: "template database " + template + " does not exist"}, nil
		}
		doc := map[string]any{
			"source": c.opts.Replicator.endpoint(template), "target": c.opts.Replicator.endpoint(database),
			"create_target": false, "docstate_channel_database": database,
		}
		if _, err := rep.Put(ctx, id, doc); err != nil && !couch.IsConflict(err) {
			return seed{}, fmt.Errorf("write %s/%s: %w", replicatorDB, id, err)
		}
		return seed{State: SeedPending}, nil
	case err != nil:
		return seed{}, fmt.Errorf("read %s/%s: %w", replicatorDB, id, err)
	}
	if s, ok, err := c.schedulerState(ctx, id); err != nil {
		return seed{}, err
	} else if ok {
		return s, nil
	}
	switch cur.State {
	case "":
		return seed{State: SeedPending}, nil
	case "triggered", "running":
		return seed{State: SeedRunning}, nil
	case "completed":
		return seed{State: SeedCompleted}, nil
	case "error":
		return seed{State: SeedCrashing, Reason: cur.Reason}, nil
	default:
		return seed{State: cur.State, Reason: cur.Reason}, nil
	}
}

// schedulerState reads /_scheduler/docs/_replicator/<id>; ok is false
// where the server has no scheduler or does not know the document yet.
func (c *Channels) schedulerState(ctx context.Context, id string) (seed, bool, error) {
	base := strings.TrimRight(c.opts.Replicator.URL, "/")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/_scheduler/docs/"+replicatorDB+"/"+url.PathEscape(id), nil)
	if err != nil {
		return seed{}, false, fmt.Errorf("scheduler request: %w", err)
	}
	req.SetBasicAuth(c.opts.Replicator.Username, c.opts.Replicator.Password)
	resp, err := c.http.Do(req)
	if err != nil {
		return seed{}, false, fmt.Errorf("read the scheduler's state of %s: %w", id, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// 404 (not scheduled yet) or 400/404 from a server without one.
		return seed{}, false, nil
	}
	var st struct {
		State string `json:"state"`
		Info  struct {
			Error string `json:"error"`
		} `json:"info"`
		Error string `json:"error"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&st); err != nil {
		return seed{}, false, fmt.Errorf("decode the scheduler's state of %s: %w", id, err)
	}
	s := seed{State: st.State, Reason: st.Info.Error}
	switch st.State {
	case "initializing", "pending":
		s.State = SeedPending
	case "running", "completed", "crashing", "failed":
	case "error":
		s.State = SeedCrashing
	default:
		return seed{}, false, nil
	}
	if s.Reason == "" {
		s.Reason = st.Error
	}
	return s, true, nil
}

// dropSeed deletes a channel's seed replication, if any: a deleted
// channel must not be written into by a replication still running.
func (c *Channels) dropSeed(ctx context.Context, database string) error {
	rep := c.opts.Client.DB(replicatorDB)
	id := SeedIDPrefix + database
	for range writeTries {
		var cur struct {
			Rev string `json:"_rev"`
		}
		err := rep.Get(ctx, id).ScanDoc(&cur)
		if couch.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s/%s: %w", replicatorDB, id, err)
		}
		if _, err := rep.Delete(ctx, id, cur.Rev); couch.IsConflict(err) {
			continue // the replicator wrote its state meanwhile
		} else if err != nil && !couch.IsNotFound(err) {
			return fmt.Errorf("delete %s/%s: %w", replicatorDB, id, err)
		}
		return nil
	}
	return errors.New("delete " + replicatorDB + "/" + id + ": kept conflicting")
}

// CheckTemplates reports whether every template name is a slug and every
// database one a channel may be seeded from (dbname.CheckTemplateDB).
func CheckTemplates(templates map[string]string) error {
	for name, db := range templates {
		if err := dbname.CheckSlug(name); err != nil {
			return fmt.Errorf("template name %w", err)
		}
		if err := dbname.CheckTemplateDB(db); err != nil {
			return fmt.Errorf("template %s: %w", name, err)
		}
	}
	return nil
}
