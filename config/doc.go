// Package config loads, validates and describes the docstate daemon's
// configuration.
//
// # Sources and precedence
//
// A Config is assembled from four sources; each later source overrides the
// earlier ones key by key:
//
//  1. built-in defaults ([Default]), which are a valid configuration for a
//     local CouchDB;
//  2. a YAML file (optional);
//  3. DOCSTATE_* environment variables, named after the dotted key
//     (engine.workers → DOCSTATE_ENGINE_WORKERS);
//  4. explicit overrides, usually from command-line flags, keyed by the
//     dotted key ("couchdb.url").
//
// The order follows how specific each source is: a flag typed for one run
// beats the environment of the service, which beats the file shared by every
// run. The environment is passed in by the caller instead of being read with
// os.Getenv so that loading is a pure function of its inputs and tests are
// hermetic.
//
// Every source goes through one key table (see [Keys]): the same parser
// turns "30s" into a duration whether it comes from the file, the
// environment or a flag, and the same table produces the documentation, so
// the sources cannot drift apart.
//
// # Strictness
//
// A typo in a configuration key is silently ignored by most loaders, and the
// daemon then runs with a default the operator thought they had changed. This
// package refuses instead:
//
//   - an unknown YAML key is an error naming the key and its line
//     (config.yaml:7: unknown key "engine.wrokers");
//   - a value of the wrong type or format is an error naming the key, the
//     line and the offending value (secrets excepted);
//   - more than one YAML document in the file is an error, and so are
//     duplicate keys and YAML merge keys ("<<");
//   - an unknown DOCSTATE_* environment variable is an error, except
//     DOCSTATE_CONFIG and DOCSTATE_TEST_*, which other parts of docstate use;
//   - an unknown override key is an error.
//
// After merging, [Config.Validate] checks every rule and reports all problems
// at once (joined with errors.Join), each naming its dotted key, so a broken
// file is fixed in one round trip rather than one error per restart.
//
// A YAML null (a key with no value, "~" or "null") leaves the key at its
// lower-precedence value; an environment variable or override that is set
// but empty sets the key to the empty string, which is how http.listen is
// turned off from the environment.
//
// # Secrets
//
// couchdb.password is never written into an error message, and
// [Config.Redacted] replaces it for printing. Prefer couchdb.password_file:
// Load reads it once, trims the trailing newline, and stores the content in
// Password so that nothing downstream touches the filesystem. Credentials
// inside couchdb.url are refused, because URLs end up in logs and errors.
package config
