//go:build unix && !linux

package couchtest

import (
	"os/exec"
	"syscall"
)

// sysProcAttr puts the server in a process group of its own, so a kill
// reaches any children too. Outside Linux there is no parent-death signal: a
// test binary killed hard leaves the server running.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// killGroup SIGKILLs the process group led by cmd's process.
func killGroup(cmd *exec.Cmd) {
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		_ = cmd.Process.Kill()
	}
}
