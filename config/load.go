package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// maxPasswordFileSize bounds the password file read. A password is short;
// the limit turns a wrong path (a log file, a device) into an error rather
// than a huge read.
const maxPasswordFileSize = 64 << 10

// Load builds the configuration from, in increasing precedence, the
// defaults, the YAML file at path (skipped when path is ""), the DOCSTATE_*
// variables in env (in os.Environ form; the caller passes it so that Load
// never reads the process environment) and overrides keyed by dotted key.
//
// Load is strict: unknown keys, unknown DOCSTATE_* variables (other than
// DOCSTATE_CONFIG and DOCSTATE_TEST_*), unknown override keys and
// unparsable values are errors. All problems from all sources are reported
// together; if the sources are well-formed the merged config is validated
// and all rule violations are reported together.
//
// On success the config is valid, and couchdb.password_file has been
// resolved: Password holds the file's content without trailing newlines
// and PasswordFile is empty, so the result validates again and nothing
// downstream reads files. On error the returned Config is the zero value.
func Load(path string, env []string, overrides map[string]string) (Config, error) {
	table := keyTable()
	c := Default()

	var errs []error
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return Config{}, fmt.Errorf("read config file: %w", err)
		}
		errs = append(errs, applyYAML(&c, path, data, table)...)
	}
	errs = append(errs, applyEnv(&c, env, table)...)
	errs = append(errs, applyOverrides(&c, overrides, table)...)
	if len(errs) > 0 {
		// Validating now could blame a key for a value that is only wrong
		// because another key failed to parse.
		return Config{}, errors.Join(errs...)
	}

	// Flat, not a nested errors.Join, so callers see one error per problem.
	errs = append(errs, c.validate()...)
	// With both set, Validate has reported the conflict; reading the file
	// would add nothing.
	if c.CouchDB.PasswordFile != "" && c.CouchDB.Password == "" {
		pw, err := readPasswordFile(c.CouchDB.PasswordFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("couchdb.password_file: %w", err))
		} else {
			c.CouchDB.Password = pw
			c.CouchDB.PasswordFile = ""
		}
	}
	if c.SMTP.PasswordFile != "" && c.SMTP.Password == "" {
		pw, err := readPasswordFile(c.SMTP.PasswordFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("smtp.password_file: %w", err))
		} else {
			c.SMTP.Password = pw
			c.SMTP.PasswordFile = ""
		}
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	return c, nil
}

// readPasswordFile returns the file's content with trailing CR/LF removed.
// Errors name the path and never include the content.
func readPasswordFile(path string) (string, error) {
	// Stat first: opening a FIFO would block, and a directory or device is
	// certainly a wrong path.
	info, err := os.Stat(path)
	if err != nil {
		return "", err // *fs.PathError names the path
	}
	if !info.Mode().IsRegular() {
		return "", fmt.Errorf("%s: not a regular file", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()

	data, err := io.ReadAll(io.LimitReader(f, maxPasswordFileSize+1))
	if err != nil {
		return "", err
	}
	if len(data) > maxPasswordFileSize {
		return "", fmt.Errorf("%s: larger than %d bytes, not a password file", path, maxPasswordFileSize)
	}
	// Only line endings are trimmed: editors and `echo` add them, while
	// spaces may be part of a password.
	pw := strings.TrimRight(string(data), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("%s: empty", path)
	}
	return pw, nil
}

// applyEnv applies DOCSTATE_* variables in order, so a later duplicate
// wins as it does for exec.Cmd.
func applyEnv(c *Config, env []string, table []key) []error {
	byEnv := make(map[string]key, len(table))
	names := make([]string, 0, len(table))
	for _, k := range table {
		byEnv[envName(k.name)] = k
		names = append(names, envName(k.name))
	}

	var errs []error
	for _, kv := range env {
		name, value, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, envPrefix) || allowedEnv(name) {
			continue
		}
		k, ok := byEnv[name]
		if !ok {
			// Only the name: an unknown variable may well be a misspelt
			// password variable.
			errs = append(errs, fmt.Errorf("unknown environment variable %s%s", name, suggest(name, names)))
			continue
		}
		if err := k.apply(c, value); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	return errs
}

// allowedEnv lists DOCSTATE_* variables that are not configuration keys
// but are read by other parts of docstate, so they are not typos.
func allowedEnv(name string) bool {
	return name == "DOCSTATE_CONFIG" || strings.HasPrefix(name, "DOCSTATE_TEST_")
}

// applyOverrides applies overrides in key order so that errors come out in
// a stable order.
func applyOverrides(c *Config, overrides map[string]string, table []key) []error {
	byName, names := indexKeys(table)
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(overrides)) {
		k, ok := byName[name]
		if !ok {
			errs = append(errs, fmt.Errorf("override: unknown key %q%s", name, suggestKey(name, names)))
			continue
		}
		if err := k.apply(c, overrides[name]); err != nil {
			errs = append(errs, fmt.Errorf("override %s: %w", name, err))
		}
	}
	return errs
}

func indexKeys(table []key) (map[string]key, []string) {
	byName := make(map[string]key, len(table))
	names := make([]string, 0, len(table))
	for _, k := range table {
		byName[k.name] = k
		names = append(names, k.name)
	}
	return byName, names
}

// applyYAML decodes one YAML document into a node tree and walks it
// against the key table. Walking the nodes, instead of decoding into the
// struct with KnownFields, gives every error the full dotted key and the
// line, parses values with the same code as the environment and overrides,
// and never echoes a value in a type error (yaml.v3's type errors quote the
// value, which could be a password).
func applyYAML(c *Config, name string, data []byte, table []key) []error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // empty file or only comments: defaults
		}
		return []error{yamlSyntaxError(name, err)}
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return []error{yamlSyntaxError(name, err)}
		}
		// A second document would be silently ignored by a plain decode;
		// whichever one the operator edited, the other is a surprise.
		return []error{fmt.Errorf("%s:%d: multiple YAML documents; a config file holds exactly one", name, extra.Line)}
	}

	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil
		}
		root = root.Content[0]
	}
	root = resolveAlias(root)
	if isNull(root) {
		return nil // "~" or a bare "---": defaults
	}
	if root.Kind != yaml.MappingNode {
		return []error{fmt.Errorf("%s:%d: the top level must be a mapping of keys, got a %s",
			name, root.Line, kindName(root.Kind))}
	}

	byName, names := indexKeys(table)
	secs := sections(table)
	w := walker{
		cfg:  c,
		file: name,
		keys: byName,
		// A misspelt section ("engin:") deserves a suggestion too.
		names:    append(names, slices.Sorted(maps.Keys(secs))...),
		sections: secs,
		seen:     make(map[string]int),
	}
	w.mapping(root, "")
	return w.errs
}

// yamlSyntaxError rewrites yaml.v3's "yaml: line N: msg" into
// "file:N: msg" to match the other errors; yaml.v3 syntax errors are plain
// strings, so nothing is lost for errors.Is/As.
func yamlSyntaxError(file string, err error) error {
	msg := err.Error()
	if rest, ok := strings.CutPrefix(msg, "yaml: line "); ok {
		if num, text, ok := strings.Cut(rest, ": "); ok {
			if line, convErr := strconv.Atoi(num); convErr == nil {
				return fmt.Errorf("%s:%d: invalid YAML: %s", file, line, text)
			}
		}
	}
	return fmt.Errorf("%s: invalid YAML: %w", file, err)
}

// sections returns the dotted prefixes of keys ("couchdb", "engine", ...):
// the names that must hold a mapping rather than a value.
func sections(table []key) map[string]bool {
	s := make(map[string]bool)
	for _, k := range table {
		for i := range len(k.name) {
			if k.name[i] == '.' {
				s[k.name[:i]] = true
			}
		}
	}
	return s
}

// walker collects every error of one file instead of stopping at the
// first, so the operator can fix them all in one go.
type walker struct {
	cfg      *Config
	file     string
	keys     map[string]key
	names    []string // keys and sections, for suggestions
	sections map[string]bool
	seen     map[string]int // dotted key → line of first occurrence
	errs     []error
}

func (w *walker) errorf(line int, format string, args ...any) {
	w.errs = append(w.errs, fmt.Errorf("%s:%d: "+format, append([]any{w.file, line}, args...)...))
}

// mapping walks a mapping node whose keys are below prefix. Recursion only
// descends into sections, whose depth is fixed by the key table, so alias
// cycles in the document cannot make it loop.
func (w *walker) mapping(n *yaml.Node, prefix string) {
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn := resolveAlias(n.Content[i])
		vn := resolveAlias(n.Content[i+1])
		if kn.Kind != yaml.ScalarNode {
			w.errorf(kn.Line, "keys must be plain strings, got a %s", kindName(kn.Kind))
			continue
		}
		if kn.ShortTag() == "!!merge" {
			// Merged keys would need their own precedence and duplicate
			// rules; a config file this small does not need them.
			w.errorf(kn.Line, "merge keys (<<) are not supported")
			continue
		}
		full := kn.Value
		if prefix != "" {
			full = prefix + "." + kn.Value
		}
		if strings.Contains(kn.Value, ".") {
			// "engine.workers: 4" at the top level would be a second
			// spelling of the same key; keep one.
			w.errorf(kn.Line, "unknown key %q (nest keys as mappings instead of writing dots)", full)
			continue
		}
		if first, dup := w.seen[full]; dup {
			w.errorf(kn.Line, "duplicate key %q (first set on line %d)", full, first)
			continue
		}
		w.seen[full] = kn.Line

		if k, ok := w.keys[full]; ok {
			w.leaf(k, kn, vn)
			continue
		}
		if w.sections[full] {
			if isNull(vn) {
				continue
			}
			if vn.Kind != yaml.MappingNode {
				w.errorf(kn.Line, "%s: must be a mapping of keys, got a %s", full, kindName(vn.Kind))
				continue
			}
			w.mapping(vn, full)
			continue
		}
		w.errorf(kn.Line, "unknown key %q%s", full, suggestKey(full, w.names))
	}
}

func (w *walker) leaf(k key, kn, vn *yaml.Node) {
	if isNull(vn) {
		return // "key:" with no value keeps the lower-precedence value
	}
	if vn.Kind != yaml.ScalarNode {
		w.errorf(kn.Line, "%s: must be a single value, got a %s", k.name, kindName(vn.Kind))
		return
	}
	if err := k.apply(w.cfg, vn.Value); err != nil {
		w.errs = append(w.errs, fmt.Errorf("%s:%d: %s: %w", w.file, kn.Line, k.name, err))
	}
}

// resolveAlias follows an alias to its anchored node. The bound guards
// against malformed trees; the parser never chains aliases.
func resolveAlias(n *yaml.Node) *yaml.Node {
	for range 8 {
		if n.Kind != yaml.AliasNode || n.Alias == nil {
			return n
		}
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func kindName(k yaml.Kind) string {
	switch k {
	case yaml.DocumentNode:
		return "document"
	case yaml.SequenceNode:
		return "list"
	case yaml.MappingNode:
		return "mapping"
	case yaml.ScalarNode:
		return "single value"
	case yaml.AliasNode:
		return "alias"
	default:
		return "node of kind " + strconv.Itoa(int(k))
	}
}
