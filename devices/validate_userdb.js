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
    // Device entries, channels and subscriptions are the daemon's; requests
    // once made are the daemon's to answer.
    deny("only the daemon changes or deletes documents here; write a new request instead");
  }
  if (newDoc._deleted) {
    deny("only the daemon deletes documents here");
  }
  var id = newDoc._id || "";
  // Ids the daemon writes: a request must not take one first.
  var daemonPrefixes = ["device:", "channel:", "channel-subscription:", "_design/"];
  for (var p = 0; p < daemonPrefixes.length; p++) {
    if (id.indexOf(daemonPrefixes[p]) === 0) {
      deny("ids starting with " + daemonPrefixes[p] + " are the daemon's");
    }
  }
  function only(allowed) {
    for (var k in newDoc) {
      if (Object.prototype.hasOwnProperty.call(newDoc, k) && !allowed[k]) {
        deny("field " + k + " is not allowed in a " + newDoc.type);
      }
    }
  }
  if (newDoc.state !== "new") {
    deny("a request starts in state new");
  }
  if (newDoc.type === "revoke_request") {
    only({ _id: true, _rev: true, _revisions: true, type: true, state: true, target: true });
    if (typeof newDoc.target !== "string" || newDoc.target.length < 1 || newDoc.target.length > 64) {
      deny("target must be the CouchDB user name of one of your devices");
    }
    return;
  }
  if (newDoc.type !== "channel_request") {
    deny("devices may only create revoke_request and channel_request documents here");
  }
  // Channel requests (package channels re-checks all of this): the owner
  // is this database's, and the database is derived from it and the
  // channel, so neither is named.
  only({ _id: true, _rev: true, _revisions: true, type: true, state: true, action: true,
    channel: true, name: true, members: true, template: true });
  if (id.indexOf("channel_request:") !== 0) {
    deny("a channel_request's id starts with channel_request:");
  }
  if (typeof newDoc.channel !== "string" || !/^[a-z0-9][a-z0-9_-]{0,63}$/.test(newDoc.channel)) {
    deny("channel must be 1 to 64 of a-z, 0-9, _ and -, starting with a letter or digit");
  }
  var actions = { create: true, rename: true, add_members: true, remove_members: true, "delete": true };
  if (typeof newDoc.action !== "string" || !actions[newDoc.action]) {
    deny("action must be create, rename, add_members, remove_members or delete");
  }
  if (newDoc.action === "create" || newDoc.action === "rename" || newDoc.name !== undefined) {
    if (typeof newDoc.name !== "string" || newDoc.name.length < 1 || newDoc.name.length > 200) {
      deny("name must be a string of 1 to 200 characters");
    }
  }
  if (newDoc.template !== undefined &&
      (newDoc.action !== "create" || typeof newDoc.template !== "string" || !/^[a-z0-9][a-z0-9_-]{0,63}$/.test(newDoc.template))) {
    deny("template must name a configured template, on a create request");
  }
  if (newDoc.members !== undefined) {
    if (Object.prototype.toString.call(newDoc.members) !== "[object Array]" || newDoc.members.length > 100) {
      deny("members must be an array of at most 100 email addresses");
    }
    for (var m = 0; m < newDoc.members.length; m++) {
      var a = newDoc.members[m];
      if (typeof a !== "string" || a.length > 254 || a.indexOf("@") < 1) {
        deny("members[" + m + "] must be an email address");
      }
    }
  }
  if ((newDoc.action === "add_members" || newDoc.action === "remove_members") &&
      (!newDoc.members || newDoc.members.length === 0)) {
    deny(newDoc.action + " needs members");
  }
}
