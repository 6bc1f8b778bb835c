// Command docstate is the daemon with docstate's built-in handler sets.
// See the cli package to build a daemon with your own.
package main

import (
	"os"

	"github.com/docstate/docstate/cmd/cli"
)

// revision and modified are written by the linker (scripts/build passes
// -ldflags "-X main.revision=... -X main.modified=..."): the VCS revision
// for builds where Go stamps none. A package variable is the only thing
// -X can set.
var revision, modified string

func main() {
	os.Exit(cli.Main(cli.Options{Revision: revision, Modified: modified}))
}
