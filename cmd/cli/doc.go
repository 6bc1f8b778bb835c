// Package cli is docstate's command line: cobra wiring around the config,
// workflow and handlers packages, and nothing else.
//
// It is a package rather than part of main so that a developer can build
// their own daemon binary with their own handler sets:
//
//	func main() {
//		os.Exit(cli.Main(cli.Options{
//			Sets: func(env cli.Env) ([]handlers.Set, error) {
//				sets, err := cli.Builtin(env)
//				return append(sets, mySet{}), err
//			},
//		}))
//	}
package cli
