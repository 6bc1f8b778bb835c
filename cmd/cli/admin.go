package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/docstate/docstate/workflow"
)

func newStatusCmd(g *globals, opts Options) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the checkpoint, pending changes, documents per type and state, claims and errors",
		Long: `Status reads the engine's checkpoint and every document of the database and
prints: the checkpoint and when it was saved, how many changes come after it
(work not yet finished or seen), documents per type and state, unsafe claims
held and expired, documents in an error state, invalid documents, and documents
waiting for a retry. It reads the whole database; progress goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, client, db, err := g.open(opts)
			if err != nil {
				return err
			}
			defer client.Close()
			progress := func(n int) { fmt.Fprintf(cmd.ErrOrStderr(), "\rread %d documents", n) }
			st, err := workflow.Inspect(cmd.Context(), db, cfg.Engine.Name, progress)
			fmt.Fprintln(cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), cfg.Database, cfg.Engine.Name, st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printStatus(w io.Writer, db, name string, st workflow.Status) {
	saved := "never"
	if !st.CheckpointSaved.IsZero() {
		saved = fmt.Sprintf("%s (%s ago)", st.CheckpointSaved.UTC().Format(time.RFC3339), time.Since(st.CheckpointSaved).Round(time.Second))
	}
	fmt.Fprintf(w, "database      %s (engine %s)\n", db, name)
	fmt.Fprintf(w, "checkpoint    %q saved %s\n", st.Checkpoint, saved)
	fmt.Fprintf(w, "pending       %d changes after the checkpoint\n", st.Pending)
	fmt.Fprintf(w, "claims        %d held, %d expired\n", st.ClaimsHeld, st.ClaimsExpired)
	fmt.Fprintf(w, "failed        %d in an error state (docstate retry re-drives them)\n", st.Failed)
	fmt.Fprintf(w, "retrying      %d waiting for a retry\n", st.RetryWaiting)
	fmt.Fprintf(w, "invalid       %d (see docstate.invalid on each)\n", st.Invalid)
	fmt.Fprintf(w, "documents     %d\n\n", st.Docs)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TYPE\tSTATE\tDOCS")
	types := make([]string, 0, len(st.States))
	for t := range st.States {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		states := make([]string, 0, len(st.States[t]))
		for s := range st.States[t] {
			states = append(states, s)
		}
		sort.Strings(states)
		for _, s := range states {
			fmt.Fprintf(tw, "%s\t%s\t%d\n", t, s, st.States[t][s])
		}
	}
	_ = tw.Flush()
}

// redrive is retry and replay: they select documents the same way and
// print what they did.
func newRedriveCmd(g *globals, opts Options, use, short, long string, withSince bool,
	act func(cmd *cobra.Command, env Env, reg *workflow.Registry, ids []string, typ, state string, dry bool) ([]workflow.Touched, error)) *cobra.Command {
	var typ, state, since string
	var dry bool
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Long:  long,
		RunE: func(cmd *cobra.Command, ids []string) error {
			cfg, client, db, err := g.open(opts)
			if err != nil {
				return err
			}
			defer client.Close()
			env := Env{Config: cfg, Client: client, DB: db, Logger: newLogger(cfg, cmd.ErrOrStderr()), Mux: http.NewServeMux()}
			_, reg, _, err := build(cfg, opts, env)
			if err != nil {
				return err
			}
			if since != "" {
				if len(ids) > 0 || typ != "" {
					return fmt.Errorf("--since cannot be combined with ids or --type")
				}
				if ids, err = workflow.ChangedSince(cmd.Context(), db, since); err != nil {
					return err
				}
				if len(ids) == 0 {
					fmt.Fprintln(cmd.OutOrStdout(), "no changes after", since)
					return nil
				}
			}
			touched, err := act(cmd, env, reg, ids, typ, state, dry)
			verb := "done"
			if dry {
				verb = "would run"
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTYPE\tFROM\tTO\tHANDLER")
			for _, t := range touched {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Type, t.From, t.To, t.Handler)
			}
			_ = tw.Flush()
			fmt.Fprintf(cmd.OutOrStdout(), "%d documents (%s)\n", len(touched), verb)
			return err
		},
	}
	cmd.Flags().StringVar(&typ, "type", "", "select every document of this type (with --state)")
	cmd.Flags().StringVar(&state, "state", "", "the state to select with --type")
	cmd.Flags().BoolVar(&dry, "dry-run", false, "print what would run, write nothing")
	if withSince {
		cmd.Flags().StringVar(&since, "since", "", "select the documents changed after this feed seq")
	}
	return cmd
}

func newRetryCmd(g *globals, opts Options) *cobra.Command {
	return newRedriveCmd(g, opts, "retry [id...]",
		"Re-drive documents in an error state back to the state they failed in",
		`Retry moves documents in an error state back to the state they failed in
(docstate.error.from) with fresh bookkeeping, so a running daemon handles them
again from the first attempt. Select by ids, or by --type and --state (the
error state, usually "error"). --dry-run prints what would run.

For an unsafe handler whose claim expired (policy fail), a retry runs the
handler again: check the side effect did not happen first.`, false,
		func(cmd *cobra.Command, env Env, reg *workflow.Registry, ids []string, typ, state string, dry bool) ([]workflow.Touched, error) {
			if len(ids) == 0 && state == "" {
				state = workflow.DefaultErrorState
			}
			return workflow.Retry(cmd.Context(), env.DB, reg, ids, typ, state, dry)
		})
}

func newReplayCmd(g *globals, opts Options) *cobra.Command {
	return newRedriveCmd(g, opts, "replay [id...]",
		"Make a running daemon handle documents again in their current state",
		`Replay writes the selected documents with their settled mark, pending
backoff and wake-ups cleared, so a running daemon sees a change and runs the
handler of each document's current state again. Select by ids, by --type and
--state, or by --since SEQ (every document changed after that feed position).
--dry-run prints what would run. Live claims are kept.`, true,
		func(cmd *cobra.Command, env Env, reg *workflow.Registry, ids []string, typ, state string, dry bool) ([]workflow.Touched, error) {
			return workflow.Replay(cmd.Context(), env.DB, reg, ids, typ, state, dry)
		})
}
