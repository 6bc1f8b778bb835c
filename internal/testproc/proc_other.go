//go:build unix && !linux

package testproc

import (
	"os/exec"
	"syscall"
)

// SysProcAttr puts the process in a process group of its own, so a kill
// reaches any children too. Outside Linux there is no parent-death signal: a
// test binary killed hard leaves the server running.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// KillGroup SIGKILLs the process group led by cmd's process.
func KillGroup(cmd *exec.Cmd) {
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		_ = cmd.Process.Kill()
	}
}
