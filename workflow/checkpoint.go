package workflow

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
)

// errRecreated means the checkpoint's database is not the one it was written
// in: the database was deleted and created again, so the old seq means
// nothing there and the feed must start over.
var errRecreated = errors.New("database was re-created")

// ErrNoDatabase means the engine's database does not exist: it was never
// created, or it was deleted. The engine waits for it; errors wrapping this
// one name the database.
var ErrNoDatabase = errors.New("database does not exist")

// missingDB is the error for a database found missing.
func missingDB(db *kivik.DB) error { return MissingDatabase(db.Name()) }

// MissingDatabase returns the error saying database name does not exist;
// it is ErrNoDatabase.
func MissingDatabase(name string) error { return noDatabaseError{name} }

// noDatabaseError names the missing database; it is ErrNoDatabase.
type noDatabaseError struct{ name string }

func (e noDatabaseError) Error() string        { return "database " + e.name + " does not exist" }
func (e noDatabaseError) Is(target error) bool { return target == ErrNoDatabase }

// checkpointDoc is stored at _local/docstate-<name>. _local documents do not
// replicate and are not in the changes feed, so saving one never wakes the
// engine itself.
type checkpointDoc struct {
	Rev   string `json:"_rev,omitempty"`
	Seq   string `json:"seq"`
	Epoch string `json:"epoch"`
	Owner string `json:"owner,omitempty"`
	Saved Stamp  `json:"saved"`
}

// checkpointer loads and saves the checkpoint. The epoch is a random id
// written with the first checkpoint; finding the document gone or with
// another epoch later means the database was re-created.
type checkpointer struct {
	db    *kivik.DB
	id    string
	owner string

	mu    sync.Mutex
	rev   string
	epoch string
	saved string
}

func (c *checkpointer) load(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var doc checkpointDoc
	err := c.db.Get(ctx, c.id).ScanDoc(&doc)
	switch {
	case couch.IsNotFound(err):
		c.rev, c.epoch, c.saved = "", newEpoch(), "0"
		if err := c.putLocked(ctx, "0"); err != nil {
			if errors.Is(err, errRecreated) {
				// The first checkpoint could not be written and is not
				// there: no database, not a re-created one (there was
				// no checkpoint to compare with).
				return "", missingDB(c.db)
			}
			return "", err
		}
		return "0", nil
	case err != nil:
		return "", fmt.Errorf("read %s: %w", c.id, err)
	}
	if doc.Epoch == "" {
		doc.Epoch = newEpoch()
	}
	if doc.Seq == "" {
		doc.Seq = "0"
	}
	c.rev, c.epoch, c.saved = doc.Rev, doc.Epoch, doc.Seq
	return doc.Seq, nil
}

// save writes seq when it moved. It returns errRecreated when the database
// is no longer the one loaded.
func (c *checkpointer) save(ctx context.Context, seq string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if seq == "" || seq == c.saved {
		return nil
	}
	return c.putLocked(ctx, seq)
}

func (c *checkpointer) putLocked(ctx context.Context, seq string) error {
	for range 3 {
		doc := checkpointDoc{Rev: c.rev, Seq: seq, Epoch: c.epoch, Owner: c.owner, Saved: Stamp{time.Now()}}
		rev, err := c.db.Put(ctx, c.id, doc)
		if err == nil {
			c.rev, c.saved = rev, seq
			return nil
		}
		if !couch.IsConflict(err) && !couch.IsNotFound(err) {
			return fmt.Errorf("save %s: %w", c.id, err)
		}
		// Another engine of the same name saved meanwhile, or the document
		// is gone. Only the epoch decides whether we are still in the same
		// database.
		if err := c.verifyLocked(ctx); err != nil {
			return err
		}
	}
	return fmt.Errorf("save %s: kept conflicting with another writer", c.id)
}

// verify checks the checkpoint document still belongs to this database.
func (c *checkpointer) verify(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.verifyLocked(ctx)
}

func (c *checkpointer) verifyLocked(ctx context.Context) error {
	var doc checkpointDoc
	err := c.db.Get(ctx, c.id).ScanDoc(&doc)
	switch {
	case couch.IsNotFound(err):
		return errRecreated
	case err != nil:
		return fmt.Errorf("read %s: %w", c.id, err)
	case doc.Epoch != c.epoch:
		return errRecreated
	}
	c.rev = doc.Rev
	return nil
}

// restart adopts a fresh database: new epoch, seq 0, written at once so the
// next verify finds it.
func (c *checkpointer) restart(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var doc checkpointDoc
	err := c.db.Get(ctx, c.id).ScanDoc(&doc)
	switch {
	case err == nil && doc.Epoch != "":
		// Another engine of the same name adopted the new database first.
		c.rev, c.epoch, c.saved = doc.Rev, doc.Epoch, ""
		return c.putLocked(ctx, "0")
	case err == nil || couch.IsNotFound(err):
		c.rev, c.epoch, c.saved = doc.Rev, newEpoch(), ""
		return c.putLocked(ctx, "0")
	default:
		return fmt.Errorf("read %s: %w", c.id, err)
	}
}

func newEpoch() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// saveCheckpoints saves the checkpoint every CheckpointInterval while it
// moves, and checks for a re-created database at least every
// ResyncInterval while it does not (an idle feed on a re-created database
// would otherwise wait for a seq the new database may never reach).
func (e *Engine) saveCheckpoints(ctx context.Context) {
	tick := time.NewTicker(e.opts.CheckpointInterval)
	defer tick.Stop()
	lastCheck := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var err error
		seq := e.tr.checkpoint()
		if seq != e.cp.savedSeq() {
			err = e.cp.save(ctx, seq)
			if err == nil {
				e.stats.checkpoints.Add(1)
				lastCheck = time.Now()
				e.checkpointSaved.Store(lastCheck.UnixNano())
			}
		} else if time.Since(lastCheck) >= e.opts.ResyncInterval {
			err = e.cp.verify(ctx)
			lastCheck = time.Now()
		}
		switch {
		case errors.Is(err, errRecreated):
			e.log.Warn("checkpoint vanished or changed epoch: database was re-created; restarting the feed from 0")
			e.requestFeedReset()
		case err != nil && ctx.Err() == nil:
			e.log.Warn("checkpoint not saved", "err", err)
		}
	}
}

func (c *checkpointer) savedSeq() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.saved
}

func (e *Engine) requestFeedReset() {
	select {
	case e.resetFeed <- struct{}{}:
	default:
	}
}
