// Package identity is the contract the device and channel handler sets
// share, so that they meet through documents rather than through each
// other's code: what an owner address is, the CouchDB role and the private
// control database derived from it, and the names of the device-document
// fields the channels set reads. It imports nothing of the project.
package identity
