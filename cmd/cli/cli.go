package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/spf13/cobra"

	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/handlers"
	"github.com/docstate/docstate/internal/couch"
)

// Env is what handler sets are built from (handlers.Env).
type Env = handlers.Env

// Options customise the command line.
type Options struct {
	// Sets returns the handler sets the daemon runs. Default: Builtin.
	Sets func(env Env) ([]handlers.Set, error)
	// Name is the command's name in help. Default "docstate".
	Name string
	// Stdout and Stderr default to the process's.
	Stdout, Stderr io.Writer
	// Environ defaults to os.Environ(); tests pass their own.
	Environ []string
	// Revision is the VCS revision the binary was built from, and Modified
	// "true" when the tree had uncommitted changes. Go stamps both into
	// the binary by itself, except with GOFLAGS=-buildvcs=false or without
	// the .git directory in the build context (a container build, a
	// tarball); scripts/build then passes them with -ldflags -X to
	// variables of package main, which hands them here. When set they win
	// over Go's stamp: someone set them on purpose.
	Revision, Modified string
}

// Builtin returns docstate's built-in handler sets that the configuration
// enables (handlers.Builtin).
func Builtin(env Env) ([]handlers.Set, error) { return handlers.Builtin(env) }

// Main runs the command line with os.Args and returns the exit code.
func Main(opts Options) int {
	root := NewRoot(opts)
	root.SetArgs(os.Args[1:])
	if err := root.ExecuteContext(context.Background()); err != nil {
		fmt.Fprintln(root.ErrOrStderr(), "docstate:", err)
		return 1
	}
	return 0
}

// globals are the flags every command shares.
type globals struct {
	configPath string
	sets       []string
	// output is -o: text or json.
	output string
}

// NewRoot builds the command tree.
func NewRoot(opts Options) *cobra.Command {
	if opts.Name == "" {
		opts.Name = "docstate"
	}
	if opts.Sets == nil {
		opts.Sets = Builtin
	}
	if opts.Environ == nil {
		opts.Environ = os.Environ()
	}
	g := &globals{}
	root := &cobra.Command{
		Use:   opts.Name,
		Short: "Move CouchDB documents through state machines",
		Long: `docstate follows a CouchDB database's _changes feed and hands every document
with a "type" and a "state" to the Go handler registered for that pair.
Safe handlers may run twice; unsafe ones run once per claim, written into the
document with MVCC before they start.

Configuration comes from a YAML file (--config or DOCSTATE_CONFIG), then
DOCSTATE_* environment variables, then --set key=value flags, each overriding
the one before. 'docstate config keys' lists every key.`,
		Example: `  docstate check --config /etc/docstate/docstate.yaml
  docstate run --config /etc/docstate/docstate.yaml
  docstate status -o json
  docstate replay --since 0 --dry-run`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	if opts.Stdout != nil {
		root.SetOut(opts.Stdout)
	}
	if opts.Stderr != nil {
		root.SetErr(opts.Stderr)
	}
	root.PersistentFlags().StringVarP(&g.configPath, "config", "c", "", "config file (YAML); default $DOCSTATE_CONFIG")
	root.PersistentFlags().StringArrayVar(&g.sets, "set", nil, "override a config key, e.g. --set engine.workers=4 (repeatable)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", outputText,
		"output format of status, check, retry, replay, config and version: text or json")
	// --set completes the config keys, "key=" and no space after it, so
	// the value comes next.
	_ = root.RegisterFlagCompletionFunc("set", func(_ *cobra.Command, _ []string, prefix string) ([]string, cobra.ShellCompDirective) {
		var keys []string
		for _, k := range config.Keys() {
			if strings.HasPrefix(k.Key, prefix) {
				keys = append(keys, k.Key+"=\t"+k.Help)
			}
		}
		return keys, cobra.ShellCompDirectiveNoSpace
	})
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{outputText, outputJSON}, cobra.ShellCompDirectiveNoFileComp))
	root.AddCommand(newRunCmd(g, opts), newCheckCmd(g, opts), newStatusCmd(g, opts), newRetryCmd(g, opts),
		newReplayCmd(g, opts), newVersionCmd(g, opts), newConfigCmd(g, opts))
	return root
}

// load reads the configuration from the file, environment and --set flags.
func (g *globals) load(opts Options) (config.Config, error) {
	path := g.configPath
	if path == "" {
		path = lookupEnv(opts.Environ, "DOCSTATE_CONFIG")
	}
	overrides := make(map[string]string, len(g.sets))
	for _, s := range g.sets {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return config.Config{}, fmt.Errorf("--set %q: want key=value", s)
		}
		overrides[k] = v
	}
	cfg, err := config.Load(path, opts.Environ, overrides)
	if err != nil {
		return config.Config{}, err
	}
	return cfg, nil
}

func lookupEnv(environ []string, name string) string {
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v
		}
	}
	return ""
}

// newLogger builds the slog logger the config asks for, on w.
func newLogger(cfg config.Config, w io.Writer) *slog.Logger {
	level := map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}[cfg.Log.Level]
	hopts := &slog.HandlerOptions{Level: level}
	if cfg.Log.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, hopts))
	}
	return slog.New(slog.NewTextHandler(w, hopts))
}

// open loads the configuration and connects: the start of every command
// that only reads or writes documents. The caller closes the client.
func (g *globals) open(opts Options) (config.Config, *kivik.Client, *kivik.DB, error) {
	cfg, err := g.load(opts)
	if err != nil {
		return cfg, nil, nil, err
	}
	client, db, err := connect(cfg)
	return cfg, client, db, err
}

// connect builds the client and database handle for cfg.
func connect(cfg config.Config) (*kivik.Client, *kivik.DB, error) {
	client, err := couch.NewClient(couch.Options{
		URL:             cfg.CouchDB.URL,
		Username:        cfg.CouchDB.Username,
		Password:        cfg.CouchDB.Password,
		MaxConnsPerHost: cfg.CouchDB.MaxConnections,
		UserAgent:       "docstate/" + version(),
	})
	if err != nil {
		return nil, nil, err
	}
	return client, client.DB(cfg.Database), nil
}

func version() string {
	info, ok := debug.ReadBuildInfo()
	if !ok || info.Main.Version == "" || info.Main.Version == "(devel)" {
		return "devel"
	}
	return info.Main.Version
}

// buildInfo is what docstate version prints. Its JSON keys are part of
// the command line's interface (version -o json).
type buildInfo struct {
	Version   string `json:"version"`
	GoVersion string `json:"go_version"`
	// Revision is "" when neither Go nor the build script stamped one.
	Revision     string `json:"revision"`
	RevisionTime string `json:"revision_time,omitempty"`
	Modified     bool   `json:"modified"`
}

// readBuildInfo combines Go's build stamp with what main passed in opts.
func readBuildInfo(opts Options) buildInfo {
	b := buildInfo{Version: version()}
	if info, ok := debug.ReadBuildInfo(); ok {
		b.GoVersion = info.GoVersion
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Revision = s.Value
			case "vcs.time":
				b.RevisionTime = s.Value
			case "vcs.modified":
				b.Modified = s.Value == "true"
			}
		}
	}
	if opts.Revision != "" {
		if opts.Revision != b.Revision {
			// Go's time belongs to Go's revision.
			b.RevisionTime = ""
		}
		b.Revision, b.Modified = opts.Revision, opts.Modified == "true"
	}
	return b
}

func newVersionCmd(g *globals, opts Options) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version and build information",
		Long: `Version prints the module version, the Go version and the VCS revision the
binary was built from (with the time of that commit and whether the tree had
local changes). Builds with GOFLAGS=-buildvcs=false or without .git carry no
revision from Go: build with scripts/build, which passes it with -ldflags.`,
		Example: `  docstate version
  docstate version -o json | jq -r .revision`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
			b := readBuildInfo(opts)
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, b)
			}
			fmt.Fprintf(out, "docstate %s\n", b.Version)
			if b.GoVersion != "" {
				fmt.Fprintf(out, "go %s\n", b.GoVersion)
			}
			if b.Revision == "" {
				fmt.Fprintln(out, "vcs.revision unknown (built without VCS information; see scripts/build)")
				return nil
			}
			fmt.Fprintf(out, "vcs.revision %s\n", b.Revision)
			if b.RevisionTime != "" {
				fmt.Fprintf(out, "vcs.time %s\n", b.RevisionTime)
			}
			fmt.Fprintf(out, "vcs.modified %t\n", b.Modified)
			return nil
		},
	}
}

func newConfigCmd(g *globals, opts Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Show configuration keys or the effective configuration",
		Example: `  docstate config keys
  docstate config show --config /etc/docstate/docstate.yaml --set engine.workers=8`,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "keys",
		Short: "List every config key with its environment variable, default and meaning",
		Example: `  docstate config keys | grep smtp
  docstate config keys -o json | jq -r '.[] | select(.type == "duration") | .key'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), config.Keys())
			}
			for _, k := range config.Keys() {
				fmt.Fprintf(cmd.OutOrStdout(), "%-30s %-36s default %-24q %s\n", k.Key, k.Env, k.Default, k.Help)
			}
			return nil
		},
	}, &cobra.Command{
		Use:   "show",
		Short: "Print the effective configuration (secrets redacted)",
		Long: `Show prints every key's effective value after the file, the environment and
--set flags, secrets redacted. -o json prints one object, key to value (all
values as strings, as in the file).`,
		Example: `  docstate config show --config /etc/docstate/docstate.yaml
  docstate config show -o json | jq -r '.["engine.workers"]'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
			cfg, err := g.load(opts)
			if err != nil {
				return err
			}
			if asJSON {
				values := map[string]string{}
				for _, kv := range cfg.Values() {
					values[kv.Key] = kv.Value
				}
				return writeJSON(cmd.OutOrStdout(), values)
			}
			return printConfig(cmd.OutOrStdout(), cfg)
		},
	})
	return cmd
}

func printConfig(w io.Writer, cfg config.Config) error {
	for _, kv := range cfg.Values() {
		if _, err := fmt.Fprintf(w, "%s=%s\n", kv.Key, kv.Value); err != nil {
			return err
		}
	}
	return nil
}

// errProblems is returned by check after it printed its problems.
var errProblems = errors.New("check failed")
