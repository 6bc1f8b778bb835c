function (newDoc, oldDoc, userCtx, secObj) {
  // docstate: who may write what in the control database. Installed by
  // devices.InstallValidation into _design/docstate-devices; the Go doc
  // comment of InstallValidation lists the same rules.
  //
  // The source must start with "function": PouchDB Server compiles it as
  // "return " + source, so a leading comment line would return undefined.
  // ES5 only, valid in strict mode (PouchDB evaluates it in strict code),
  // no helpers outside this function (CouchDB compiles one expression).

  // Set by InstallValidation: a role that may write everything, or null.
  var WRITER_ROLE = null /* docstate:writer-role */;

  // Fields a device may add, change or remove after creation, and the
  // state the stored document must be in for each.
  var REQUESTS = {
    confirm_attempt: "confirming",
    resend_requested: "confirming",
    revoke_requested: "active"
  };
  // Fields a device may write when it creates its document; anything else
  // (every field docstate writes, the engine's "docstate" bookkeeping,
  // _attachments) is refused.
  var CREATE = {
    _id: true, _rev: true, _revisions: true,
    type: true, state: true, owner: true, device_name: true, credentials: true
  };
  // Never compared: the revision bookkeeping differs on every write.
  var META = { _id: true, _rev: true, _revisions: true };

  function has(o, k) {
    return Object.prototype.hasOwnProperty.call(o, k);
  }
  function isObj(v) {
    return v !== null && typeof v === "object";
  }
  function deny(why) {
    throw ({ forbidden: "docstate: " + why });
  }
  function contains(list, v) {
    if (!list || typeof list.length !== "number") {
      return false;
    }
    for (var i = 0; i < list.length; i++) {
      if (list[i] === v) {
        return true;
      }
    }
    return false;
  }
  // equal compares two JSON values: same type, same numbers and strings,
  // arrays element by element, objects key by key in any order.
  function equal(a, b) {
    if (a === b) {
      return true;
    }
    if (!isObj(a) || !isObj(b)) {
      return false;
    }
    var aa = Object.prototype.toString.call(a) === "[object Array]";
    var ba = Object.prototype.toString.call(b) === "[object Array]";
    if (aa !== ba) {
      return false;
    }
    var i, k;
    if (aa) {
      if (a.length !== b.length) {
        return false;
      }
      for (i = 0; i < a.length; i++) {
        if (!equal(a[i], b[i])) {
          return false;
        }
      }
      return true;
    }
    for (k in a) {
      if (has(a, k) && (!has(b, k) || !equal(a[k], b[k]))) {
        return false;
      }
    }
    for (k in b) {
      if (has(b, k) && !has(a, k)) {
        return false;
      }
    }
    return true;
  }

  var roles = (userCtx && userCtx.roles) || [];
  var name = userCtx ? userCtx.name : null;

  // Rule 1: server admins, the writer role and database admins write
  // anything. (Database admins can replace this design document anyway.)
  if (contains(roles, "_admin") || (WRITER_ROLE !== null && contains(roles, WRITER_ROLE))) {
    return;
  }
  var admins = (secObj && secObj.admins) || {};
  if ((name && contains(admins.names, name))) {
    return;
  }
  for (var r = 0; r < roles.length; r++) {
    if (contains(admins.roles, roles[r])) {
      return;
    }
  }

  // Everyone else:
  // Rule 2: no design documents (CouchDB and PouchDB Server already
  // restrict them to admins).
  if (String(newDoc._id).indexOf("_design/") === 0) {
    deny("only admins may write design documents");
  }
  // Rule 3: no deletions.
  if (newDoc._deleted === true) {
    deny("devices may not delete documents (_deleted)");
  }
  // Rule 4: only documents of type "device", and never an id of the
  // per-address rate-limit documents.
  if (String(newDoc._id).indexOf("device-address:") === 0) {
    deny("device-address documents are written by docstate only (_id)");
  }
  if (newDoc.type !== "device") {
    deny("devices may only write documents of type \"device\" (type)");
  }
  var k;
  var old = oldDoc && oldDoc._deleted !== true ? oldDoc : null;
  if (old === null) {
    // Rule 5: creation (also over a deleted document) only in state "new"
    // and only with the fields a device writes.
    if (newDoc.state !== "new") {
      deny("a device document must be created in state \"new\" (state)");
    }
    for (k in newDoc) {
      if (has(newDoc, k) && !has(CREATE, k)) {
        deny("field " + k + " may not be written when creating a device document");
      }
    }
    return;
  }
  if (old.type !== "device") {
    deny("devices may only write documents of type \"device\" (type)");
  }
  // Rule 6: an update changes only the device's requests, each only in the
  // state that reads it; every other field must stay as it is.
  for (k in newDoc) {
    if (has(newDoc, k) && !has(META, k)) {
      if (has(REQUESTS, k)) {
        if (!(has(old, k) && equal(old[k], newDoc[k])) && old.state !== REQUESTS[k]) {
          deny("field " + k + " may only be written in state \"" + REQUESTS[k] + "\"");
        }
      } else if (!has(old, k)) {
        deny("field " + k + " is written by docstate only and may not be added");
      } else if (!equal(old[k], newDoc[k])) {
        deny("field " + k + " is written by docstate only and may not be changed");
      }
    }
  }
  for (k in old) {
    if (has(old, k) && !has(META, k) && !has(newDoc, k)) {
      if (has(REQUESTS, k)) {
        if (old.state !== REQUESTS[k]) {
          deny("field " + k + " may only be removed in state \"" + REQUESTS[k] + "\"");
        }
      } else {
        deny("field " + k + " is written by docstate only and may not be removed");
      }
    }
  }
}
