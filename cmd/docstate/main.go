// Command docstate is the daemon with docstate's built-in handler sets.
// See the cli package to build a daemon with your own.
package main

import (
	"os"

	"github.com/docstate/docstate/cmd/cli"
)

func main() {
	os.Exit(cli.Main(cli.Options{}))
}
