package cli

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/docstate/docstate/workflow"
	"github.com/docstate/docstate/workflow/admin"
)

func newStatusCmd(g *globals, opts Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the checkpoint, pending changes, documents per type and state, claims and errors",
		Long: `Status reads the engine's checkpoint and every document of the database and
prints: the checkpoint and when it was saved, how many changes come after it
(work not yet finished or seen), documents per type and state, unsafe claims
held and expired, documents in an error state, invalid documents, and documents
waiting for a retry. It reads the whole database; progress goes to stderr
when it is a terminal.`,
		Example: `  docstate status --config /etc/docstate/docstate.yaml
  docstate status -o json | jq .failed`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
			cfg, client, db, err := g.open(opts)
			if err != nil {
				return err
			}
			defer client.Close()
			var progress func(int)
			if isTerminal(cmd.ErrOrStderr()) {
				progress = func(n int) { fmt.Fprintf(cmd.ErrOrStderr(), "\rread %d documents", n) }
			}
			st, err := admin.Inspect(cmd.Context(), db, cfg.Engine.Name, progress)
			if progress != nil {
				fmt.Fprintln(cmd.ErrOrStderr())
			}
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), st)
			}
			printStatus(cmd.OutOrStdout(), cfg.Database, cfg.Engine.Name, st)
			return nil
		},
	}
	addJSONFlag(cmd)
	return cmd
}

func printStatus(w io.Writer, db, name string, st admin.Status) {
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
func newRedriveCmd(g *globals, opts Options, use, short, long, example string, withSince bool,
	act func(cmd *cobra.Command, env Env, reg *workflow.Registry, sel admin.Selection) (admin.Report, error)) *cobra.Command {
	var since string
	var sel admin.Selection
	cmd := &cobra.Command{
		Use:     use,
		Short:   short,
		Long:    long,
		Example: example,
		RunE: func(cmd *cobra.Command, ids []string) error {
			asJSON, err := g.jsonOutput(cmd)
			if err != nil {
				return err
			}
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
			sel.IDs = ids
			if since != "" {
				if len(ids) > 0 || sel.Type != "" {
					return fmt.Errorf("--since cannot be combined with ids or --type")
				}
				if sel.IDs, err = admin.ChangedSince(cmd.Context(), db, since); err != nil {
					return err
				}
			}
			stderr := cmd.ErrOrStderr()
			progressed := false
			if isTerminal(stderr) {
				sel.Progress = func(done, total int) {
					progressed = true
					fmt.Fprintf(stderr, "\r%d/%d documents", done, total)
				}
			}
			var rep admin.Report
			if since == "" || len(sel.IDs) > 0 {
				rep, err = act(cmd, env, reg, sel)
			} else {
				rep = admin.Report{DryRun: sel.DryRun, Touched: []admin.Touched{}, Errors: []admin.DocError{}}
			}
			if progressed {
				fmt.Fprintln(stderr)
			}
			if asJSON {
				if jerr := writeJSON(cmd.OutOrStdout(), rep); jerr != nil {
					return jerr
				}
			} else {
				printReport(cmd.OutOrStdout(), stderr, rep)
			}
			if err != nil {
				return err
			}
			if len(rep.Errors) > 0 {
				// Exit non-zero so a script notices; the others were done.
				return fmt.Errorf("%d of %d documents failed", len(rep.Errors),
					len(rep.Touched)+rep.Skipped.Total()+len(rep.Errors))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&sel.Type, "type", "", "select every document of this type (with --state)")
	cmd.Flags().StringVar(&sel.State, "state", "", "the state to select with --type")
	cmd.Flags().BoolVar(&sel.DryRun, "dry-run", false, "print what would run, write nothing")
	if withSince {
		cmd.Flags().StringVar(&since, "since", "", "select the documents changed after this feed seq")
	}
	return cmd
}

// printReport writes the documents acted on and a summary line to out, and
// each failed document to errOut.
func printReport(out, errOut io.Writer, rep admin.Report) {
	if len(rep.Touched) > 0 {
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTYPE\tFROM\tTO\tHANDLER")
		for _, t := range rep.Touched {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Type, t.From, t.To, t.Handler)
		}
		_ = tw.Flush()
	}
	for _, e := range rep.Errors {
		fmt.Fprintf(errOut, "failed %s: %s\n", e.ID, e.Error)
	}
	verb := "done"
	if rep.DryRun {
		verb = "would run"
	}
	line := fmt.Sprintf("%d documents (%s)", len(rep.Touched), verb)
	sk := rep.Skipped
	if n := sk.Total(); n > 0 {
		var why []string
		for _, c := range []struct {
			n    int
			what string
		}{{sk.Design, "design"}, {sk.Local, "local"}, {sk.Missing, "missing"}, {sk.Unregistered, "unregistered type"},
			{sk.NoState, "no state"}, {sk.NotFailed, "not in an error state"}} {
			if c.n > 0 {
				why = append(why, fmt.Sprintf("%d %s", c.n, c.what))
			}
		}
		line += fmt.Sprintf(", %d skipped (%s)", n, strings.Join(why, ", "))
	}
	if len(rep.Errors) > 0 {
		line += fmt.Sprintf(", %d failed", len(rep.Errors))
	}
	fmt.Fprintln(out, line)
}

func newRetryCmd(g *globals, opts Options) *cobra.Command {
	return newRedriveCmd(g, opts, "retry [id...]",
		"Re-drive documents in an error state back to the state they failed in",
		`Retry moves documents in an error state back to the state they failed in
(docstate.error.from) with fresh bookkeeping, so a running daemon handles them
again from the first attempt. Select by ids, or by --type and --state (the
error state, usually "error"). --dry-run prints what would run.

Documents not in an error state, design and _local documents, and documents
of types this binary has no handlers for are skipped and counted. A document
that cannot be read or written is reported and the others are still done;
the exit code is then 1. Progress goes to stderr when it is a terminal.

For an unsafe handler whose claim expired (policy fail), a retry runs the
handler again: check the side effect did not happen first.`,
		`  docstate retry --type order --dry-run
  docstate retry order-17 order-18
  docstate retry --type order --state error -o json | jq '.documents[].id'`, false,
		func(cmd *cobra.Command, env Env, reg *workflow.Registry, sel admin.Selection) (admin.Report, error) {
			if len(sel.IDs) == 0 && sel.State == "" {
				sel.State = workflow.DefaultErrorState
			}
			return admin.Retry(cmd.Context(), env.DB, reg, sel)
		})
}

func newReplayCmd(g *globals, opts Options) *cobra.Command {
	return newRedriveCmd(g, opts, "replay [id...]",
		"Make a running daemon handle documents again in their current state",
		`Replay writes the selected documents with their settled mark, pending
backoff and wake-ups cleared, so a running daemon sees a change and runs the
handler of each document's current state again. Select by ids, by --type and
--state, or by --since SEQ (every document changed after that feed position).
--dry-run prints what would run. Live claims are kept.

Design and _local documents, documents gone since, documents of types this
binary has no handlers for and documents without a state are skipped and
counted. A document that cannot be read or written is reported and the
others are still done; the exit code is then 1. Progress goes to stderr when
it is a terminal.`,
		`  docstate replay --since 0 --dry-run
  docstate replay --type order --state accepted
  docstate replay order-17 -o json`, true,
		func(cmd *cobra.Command, env Env, reg *workflow.Registry, sel admin.Selection) (admin.Report, error) {
			return admin.Replay(cmd.Context(), env.DB, reg, sel)
		})
}
