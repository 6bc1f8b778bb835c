function (newDoc, oldDoc, userCtx, secObj) {
  // docstate: who may write what in a per-owner control database
  // (userctl-*). Installed by devices.ProvisionUserDB into
  // _design/docstate-userdb. Only members (the owner's devices, by role)
  // reach this function at all: _security refuses everyone else.
  //
  // The source must start with "function" (PouchDB Server compiles it as
  // "return " + source). ES5 only, valid in strict mode.
  var roles = (userCtx && userCtx.roles) || [];
  for (var i = 0; i < roles.length; i++) {
    if (roles[i] === "_admin") {
      return;
    }
  }
  function deny(why) {
    throw ({ forbidden: "docstate: " + why });
  }
  if (oldDoc) {
    // Device entries, and requests once made, are the daemon's to change.
    deny("only the daemon changes or deletes documents here; write a new request instead");
  }
  if (newDoc._deleted) {
    deny("only the daemon deletes documents here");
  }
  if (newDoc.type !== "revoke_request") {
    deny("devices may only create revoke_request documents here");
  }
  var allowed = { _id: true, _rev: true, _revisions: true, type: true, state: true, target: true };
  for (var k in newDoc) {
    if (Object.prototype.hasOwnProperty.call(newDoc, k) && !allowed[k]) {
      deny("field " + k + " is not allowed in a revoke_request");
    }
  }
  if (newDoc.state !== "new") {
    deny("a revoke_request starts in state new");
  }
  if (typeof newDoc.target !== "string" || newDoc.target.length < 1 || newDoc.target.length > 64) {
    deny("target must be the CouchDB user name of one of your devices");
  }
}
