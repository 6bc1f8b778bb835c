package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// Output formats of -o/--output.
const (
	outputText = "text"
	outputJSON = "json"
)

// jsonOutput says whether cmd prints JSON: -o json, or the --json flag of
// the commands that have one (status and check had it first).
func (g *globals) jsonOutput(cmd *cobra.Command) (bool, error) {
	if f := cmd.Flags().Lookup("json"); f != nil && f.Changed && f.Value.String() == "true" {
		return true, nil
	}
	switch g.output {
	case "", outputText:
		return false, nil
	case outputJSON:
		return true, nil
	}
	return false, fmt.Errorf("-o %q: want %s or %s", g.output, outputText, outputJSON)
}

// addJSONFlag adds --json, the same as -o json.
func addJSONFlag(cmd *cobra.Command) {
	cmd.Flags().Bool("json", false, "print JSON (the same as -o json)")
}

// writeJSON prints v indented, one document per command: scripts read it
// with jq. The keys are lower-case and stable: add keys, never rename them.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}

// isTerminal says whether w is a terminal: progress lines are for people,
// and would only clutter a log or a pipe.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	// A character device is not enough: /dev/null is one.
	return ok && term.IsTerminal(int(f.Fd()))
}
