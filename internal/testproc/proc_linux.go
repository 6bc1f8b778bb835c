package testproc

import (
	"os/exec"
	"syscall"
)

// SysProcAttr puts the process in a process group of its own, so a kill
// reaches any children too, and has the kernel SIGKILL it when the test
// binary dies without cleaning up (a test timeout panics straight through
// Main). Pdeathsig follows the OS thread that started the child; Go does not
// retire threads unless a goroutine exits while locked to one, which the
// harness never does.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// KillGroup SIGKILLs the process group led by cmd's process.
func KillGroup(cmd *exec.Cmd) {
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		// The group is gone or was never made; the process itself may not be.
		_ = cmd.Process.Kill()
	}
}
