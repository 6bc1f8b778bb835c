// Package mailtest runs real SMTP servers for docstate's tests.
//
// Two servers, for two purposes:
//
//   - [StartMock] runs github.com/mocktools/go-smtp-mock/v2 in process on a
//     free loopback port: fast, no AUTH, no STARTTLS, and scriptable SMTP
//     replies (a recipient that gets 550 or 421), for the many-devices and
//     error-classification tests. Clients use go-mail with
//     mail.WithTLSPolicy(mail.NoTLS) and an explicit HELO.
//   - [StartMaildev] runs the maildev 3.0.0 process from teststack/
//     node_modules (installed by scripts/teststack install) with SMTP AUTH,
//     and reads what arrived through its REST API (GET /api/email). It is
//     the end-to-end server: a real MTA-like SMTP stack, separate process,
//     real authentication.
//
// A missing maildev installation fails the test; it is never a skip, so a
// green run always means the mail really went through an SMTP server.
package mailtest
