package config_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/docstate/docstate/config"
)

func TestDevicesAndSMTPRules(t *testing.T) {
	enabled := func(c *config.Config) { c.Devices.Enabled = true }
	tests := []struct {
		name string
		mod  func(*config.Config)
		want []string
	}{
		{"disabled needs nothing", func(*config.Config) {}, nil},
		{"enabled needs host, from, secret", enabled, []string{
			"smtp.host: required when devices.enabled is true",
			"smtp.from: required when devices.enabled is true",
			"devices.secret_file: required when devices.enabled is true",
		}},
		{"enabled and complete", func(c *config.Config) {
			enabled(c)
			c.SMTP.Host, c.SMTP.From, c.Devices.SecretFile = "mail.example.com", "docstate@example.com", "/etc/s"
		}, nil},
		{"bad values", func(c *config.Config) {
			c.SMTP.Host = "mail.example.com:25"
			c.SMTP.Port = 0
			c.SMTP.TLS = "always"
			c.SMTP.HELO = "a b"
			c.SMTP.From = "Docstate <d@example.com>"
			c.Devices.BaseURL = "ftp://x"
			c.Devices.CodeTTL = 0
			c.Devices.MaxAttempts = 0
		}, []string{
			`smtp.host: must be a host name or IP address without port, got "mail.example.com:25"`,
			"smtp.port: must be between 1 and 65535, got 0",
			`smtp.tls: must be one of mandatory, opportunistic, none, got "always"`,
			`smtp.helo: must not contain spaces or line breaks, got "a b"`,
			`smtp.from: must be a bare email address such as docstate@example.com, got "Docstate <d@example.com>"`,
			`devices.base_url: must be an absolute http(s) URL without credentials, query or fragment, got "ftp://x"`,
			"devices.code_ttl: must be between 1m and 24h, got 0s",
			"devices.max_attempts: must be between 1 and 100, got 0",
		}},
		{"implicit TLS without TLS", func(c *config.Config) { c.SMTP.TLS, c.SMTP.ImplicitTLS = "none", true },
			[]string{"smtp.implicit_tls: cannot be combined with smtp.tls none"}},
		{"password without user, both password forms", func(c *config.Config) { c.SMTP.Password, c.SMTP.PasswordFile = "pw", "/f" },
			[]string{"smtp.username: required when smtp.password or smtp.password_file is set",
				"smtp.password_file: cannot be combined with smtp.password; set only one"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := config.Default()
			tt.mod(&c)
			if got := errorLines(c.Validate()); !slices.Equal(got, tt.want) {
				t.Errorf("Validate() =\n%q\nwant\n%q", got, tt.want)
			}
		})
	}
}

func TestSMTPPasswordFileAndRedaction(t *testing.T) {
	const secret = "smtp-secret-99"
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load("", []string{"DOCSTATE_SMTP_USERNAME=relay", "DOCSTATE_SMTP_PASSWORD_FILE=" + pw}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.SMTP.Password != secret || c.SMTP.PasswordFile != "" {
		t.Fatalf("password %q file %q", c.SMTP.Password, c.SMTP.PasswordFile)
	}
	if r := c.Redacted(); r.SMTP.Password != "[redacted]" {
		t.Fatalf("Redacted() SMTP password %q", r.SMTP.Password)
	}
	// Both forms at once: an error that does not show the secret.
	_, err = config.Load("", []string{"DOCSTATE_SMTP_USERNAME=relay", "DOCSTATE_SMTP_PASSWORD=" + secret,
		"DOCSTATE_SMTP_PASSWORD_FILE=" + pw}, nil)
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Fatalf("Load with both password forms: %v", err)
	}
}
