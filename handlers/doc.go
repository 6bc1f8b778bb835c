// Package handlers assembles docstate's built-in handler sets onto a
// workflow registry. It is also the pattern to copy for your own: a handler
// set is a Set (a name and a Register method), listed explicitly in code,
// with a compile-time check that it implements Set. Nothing registers itself
// from init(): what a binary runs is what its main package lists.
package handlers
