package channels

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	kivik "github.com/go-kivik/kivik/v4"

	"github.com/docstate/docstate/internal/couch"
	"github.com/docstate/docstate/internal/identity"
	"github.com/docstate/docstate/workflow"
)

// request is a device's channel request, validated.
type request struct {
	slug, action, name, template string
	members                      []string
}

// parseRequest validates a request; the error is the reason a refusal
// records. The validation function refuses the same before the write on
// CouchDB; this holds wherever it did not run.
func (c *Channels) parseRequest(doc *workflow.Doc) (request, error) {
	var r request
	if !strings.HasPrefix(doc.ID, RequestIDPrefix) {
		return r, fmt.Errorf("a request's id must start with %q", RequestIDPrefix)
	}
	if doc.Has(FieldOwner) || doc.Has(FieldDatabase) {
		return r, errors.New("a request names no owner and no database: both follow from the database it is written in")
	}
	if ok, err := doc.Field(FieldChannel, &r.slug); err != nil || !ok {
		return r, errors.New("channel must be a string")
	}
	if err := CheckSlug(r.slug); err != nil {
		return r, err
	}
	if ok, err := doc.Field(FieldAction, &r.action); err != nil || !ok {
		return r, errors.New("action must be a string")
	}
	needName, needMembers := false, false
	switch r.action {
	case ActionCreate:
		needName = true
	case ActionRename:
		needName = true
	case ActionAddMembers, ActionRemoveMembers:
		needMembers = true
	case ActionDelete:
	default:
		return r, fmt.Errorf("action %q is not one of create, rename, add_members, remove_members, delete", r.action)
	}
	if needName || doc.Has(FieldName) {
		if ok, err := doc.Field(FieldName, &r.name); err != nil || !ok {
			return r, errors.New("name must be a string")
		}
		if err := CheckName(r.name); err != nil {
			return r, err
		}
	}
	if raw, ok := rawField(doc, FieldMembers); ok {
		var members []json.RawMessage
		if err := json.Unmarshal(raw, &members); err != nil {
			return r, errors.New("members must be an array of email addresses")
		}
		if len(members) > c.opts.MaxMembers {
			return r, fmt.Errorf("members lists %d addresses, more than %d", len(members), c.opts.MaxMembers)
		}
		for i, m := range members {
			var s string
			if len(m) == 0 || m[0] != '"' || json.Unmarshal(m, &s) != nil {
				return r, fmt.Errorf("members[%d] must be a string", i)
			}
			if err := identity.CheckEmail(s); err != nil {
				return r, fmt.Errorf("members[%d] %w", i, err)
			}
			r.members = append(r.members, strings.ToLower(s))
		}
	}
	if doc.Has(FieldTemplate) {
		if ok, err := doc.Field(FieldTemplate, &r.template); err != nil || !ok || r.action != ActionCreate {
			return r, errors.New("template must be a string, on a create request")
		}
		if _, ok := c.opts.Templates[r.template]; !ok {
			return r, fmt.Errorf("no template %q is configured", r.template)
		}
	}
	if needMembers && len(r.members) == 0 {
		return r, fmt.Errorf("%s needs members", r.action)
	}
	slices.Sort(r.members)
	r.members = slices.Compact(r.members)
	return r, nil
}

// handleRequest applies a device's request to its channel document and
// records the outcome on the request: applied (with the channel's id), or
// refused with a reason. Applying is a compare-and-swap on the channel
// document, which remembers the requests applied to it, so a request run
// twice changes it once.
func (c *Channels) handleRequest(ctx context.Context, doc *workflow.Doc) (workflow.Result, error) {
	refuse := func(why string) (workflow.Result, error) {
		return workflow.Transition(StateRefused).Set(FieldReason, why), nil
	}
	role, ok := roleOfUserDB(doc.DB().Name())
	if !ok {
		return refuse("not in a per-owner control database")
	}
	req, err := c.parseRequest(doc)
	if err != nil {
		return refuse(err.Error())
	}
	db := doc.DB()
	id := ChannelIDPrefix + req.slug
	for range writeTries {
		cur, err := readMap(ctx, db, id)
		if err != nil {
			return workflow.Result{}, err
		}
		next, why := c.apply(cur, req, role, doc.ID)
		if why != "" {
			return refuse(why)
		}
		if next != nil {
			next["_id"], _ = json.Marshal(id)
			if _, err := db.Put(ctx, id, next); couch.IsConflict(err) {
				continue
			} else if err != nil {
				return workflow.Result{}, fmt.Errorf("write %s: %w", id, err)
			}
			c.log.Info("channel request applied", "database", db.Name(), "request", doc.ID, "channel", id, "action", req.action)
		}
		return workflow.Transition(StateApplied).
			Set(FieldChannelDoc, id).
			Set(FieldAppliedAt, time.Now().UTC().Format(time.RFC3339)), nil
	}
	return workflow.Result{}, fmt.Errorf("write %s: kept conflicting", id)
}

// apply returns the channel document with req applied to cur (nil: there
// is nothing to write, it was applied already), or why it is refused.
func (c *Channels) apply(cur map[string]json.RawMessage, req request, role, requestID string) (map[string]json.RawMessage, string) {
	var applied []string
	state := ""
	if cur != nil {
		_ = json.Unmarshal(cur[FieldApplied], &applied)
		_ = json.Unmarshal(cur["state"], &state)
		if slices.Contains(applied, requestID) {
			return nil, ""
		}
	}
	deleteRequested := false
	if cur != nil {
		_ = json.Unmarshal(cur[FieldDeleteRequested], &deleteRequested)
	}
	gone := cur == nil || state == StateDeleted
	var members []string
	if cur != nil && !gone {
		_ = json.Unmarshal(cur[FieldMembers], &members)
	}
	next := map[string]json.RawMessage{}
	for k, v := range cur {
		next[k] = v
	}
	set := func(k string, v any) {
		b, _ := json.Marshal(v)
		next[k] = b
	}
	switch {
	case req.action == ActionCreate && !gone:
		return nil, "channel " + req.slug + " exists; rename it or change its members instead"
	case req.action == ActionCreate:
		// A deleted channel can be created again: same database name,
		// created afresh, without the old one's records.
		for _, k := range []string{FieldDeleteRequested, FieldDeletedAt, FieldMemberRoles, FieldSubscriptions, FieldSynced, FieldTemplate, FieldSeed} {
			delete(next, k)
		}
		set("type", DocType)
		set("state", StateNew)
		set(FieldOwnerRole, role)
		set(FieldName, req.name)
		set(FieldMembers, req.members)
		set(FieldCreatedBy, requestID)
		if req.template != "" {
			set(FieldTemplate, req.template)
		}
	case gone && req.action == ActionDelete:
		if cur == nil {
			return nil, "no channel " + req.slug + " to delete"
		}
		return nil, "" // deleted already
	case gone:
		return nil, "no channel " + req.slug
	case req.action == ActionDelete:
		if deleteRequested || state == StateDeleting {
			return nil, ""
		}
		set(FieldDeleteRequested, true)
	case deleteRequested || state == StateDeleting:
		return nil, "channel " + req.slug + " is being deleted"
	case req.action == ActionRename:
		set(FieldName, req.name)
		if len(req.members) > 0 {
			return nil, "rename takes a name, not members"
		}
	case req.action == ActionAddMembers:
		members = append(members, req.members...)
		slices.Sort(members)
		members = slices.Compact(members)
		if len(members) > c.opts.MaxMembers {
			return nil, fmt.Sprintf("the channel would have %d members, more than %d", len(members), c.opts.MaxMembers)
		}
		set(FieldMembers, members)
	case req.action == ActionRemoveMembers:
		members = slices.DeleteFunc(members, func(m string) bool { return slices.Contains(req.members, m) })
		set(FieldMembers, members)
	}
	applied = append(applied, requestID)
	if len(applied) > keepApplied {
		applied = applied[len(applied)-keepApplied:]
	}
	set(FieldApplied, applied)
	return next, ""
}

// readMap reads a document as raw fields, nil when it does not exist.
func readMap(ctx context.Context, db *kivik.DB, id string) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	err := db.Get(ctx, id).ScanDoc(&m)
	if couch.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", id, err)
	}
	return m, nil
}
