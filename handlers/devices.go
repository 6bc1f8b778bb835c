package handlers

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/docstate/docstate/config"
	"github.com/docstate/docstate/devices"
	"github.com/docstate/docstate/internal/metrics"
	"github.com/docstate/docstate/workflow"
)

// deviceSet is the device registration handler set, as the daemon runs it:
// its handlers, its confirmation page on the daemon's listener, and the
// validation function it installs in the control database.
type deviceSet struct {
	*devices.Devices
	env Env
	// followers run in the users pairing mode, nil otherwise.
	followers *devices.Followers
}

var (
	_ Set         = deviceSet{}
	_ Provisioner = deviceSet{}
	_ Runner      = deviceSet{}
	_ Repairer    = deviceSet{}
)

// Run follows _users and the owners' control databases in the users
// pairing mode; in the control mode there is nothing beside the engine.
func (s deviceSet) Run(ctx context.Context) error {
	if s.followers == nil {
		return nil
	}
	return s.followers.Run(ctx)
}

// Ready is the followers' readiness, nil in the control mode.
func (s deviceSet) Ready() error {
	if s.followers == nil {
		return nil
	}
	return s.followers.Ready()
}

func (deviceSet) Name() string { return "devices" }

// Provision installs the control database's validation function, which
// keeps devices from writing the fields the daemon trusts. Only server
// admins pass it: the daemon must be one anyway, to write _users entries
// with roles.
func (s deviceSet) Provision(ctx context.Context) error {
	_, err := s.ProvisionControl(ctx)
	return err
}

// Repair puts the validation function back when it is missing or was
// changed.
func (s deviceSet) Repair(ctx context.Context) ([]string, error) {
	written, err := s.ProvisionControl(ctx)
	if written {
		return []string{"validation function " + devices.DesignDocID + " or _security of " + s.env.DB.Name()}, err
	}
	return nil, err
}

// countingMailer counts each send for docstate_emails_sent_total: ok,
// temporary (retried) or permanent (the mailer marks those Terminal).
type countingMailer struct {
	devices.Mailer
	count func(result string)
}

func (c countingMailer) Send(ctx context.Context, m devices.Message) error {
	err := c.Mailer.Send(ctx, m)
	switch {
	case err == nil:
		c.count(metrics.EmailOK)
	case workflow.IsTerminal(err):
		c.count(metrics.EmailPermanent)
	default:
		c.count(metrics.EmailTemporary)
	}
	return err
}

// newDevices builds the device set from the configuration.
func newDevices(env Env, userDBHandlers []func(*workflow.Registry) error) (deviceSet, error) {
	cfg := env.Config
	secret, err := devices.ReadSecretFile(cfg.Devices.SecretFile)
	if err != nil {
		return deviceSet{}, fmt.Errorf("devices.secret_file: %w", err)
	}
	smtp, err := NewSMTPMailer(cfg, env.Logger)
	if err != nil {
		return deviceSet{}, err
	}
	var mailer devices.Mailer = smtp
	if env.Metrics != nil {
		mailer = countingMailer{Mailer: smtp, count: env.Metrics.EmailSent}
	}
	var tmpl *devices.Templates
	if cfg.Devices.TemplatesDir != "" {
		if tmpl, err = devices.LoadTemplates(cfg.Devices.TemplatesDir); err != nil {
			return deviceSet{}, fmt.Errorf("devices.templates_dir: %w", err)
		}
	}
	d, err := devices.New(devices.Options{
		Client:         env.Client,
		DB:             env.DB,
		Mailer:         mailer,
		From:           cfg.SMTP.From,
		BaseURL:        cfg.Devices.BaseURL,
		Secret:         secret,
		CodeTTL:        cfg.Devices.CodeTTL,
		ResendInterval: cfg.Devices.ResendInterval,
		MaxAttempts:    cfg.Devices.MaxAttempts,
		AddressSends:   cfg.Devices.AddressSends,
		AddressWindow:  cfg.Devices.AddressWindow,
		GlobalSends:    cfg.Devices.GlobalSends,
		GlobalWindow:   cfg.Devices.GlobalWindow,
		MaxIterations:  cfg.Devices.MaxIterations,
		Templates:      tmpl,
		Logger:         env.Logger,
		Pairing:        cfg.Devices.Pairing,
		PublicURL:      cfg.Devices.PublicURL,
	})
	if err != nil {
		return deviceSet{}, err
	}
	var followers *devices.Followers
	if cfg.Devices.Pairing == devices.PairingUsers {
		eo := EngineOptions(cfg)
		eo.Logger = env.Logger
		if env.Metrics != nil {
			eo.OnRun = env.Metrics.OnRun
		}
		so, _ := SupervisorOptions(cfg)
		if followers, err = d.NewFollowers(devices.FollowerOptions{Engine: eo, Supervisor: so, HealInterval: cfg.Devices.HealInterval, Handlers: userDBHandlers}); err != nil {
			return deviceSet{}, err
		}
	}
	if env.PublicMux != nil {
		env.PublicMux.Handle("/devices/", d.Handler())
	}
	return deviceSet{Devices: d, env: env, followers: followers}, nil
}

// NewSMTPMailer builds the mailer the device set sends with; check dials
// it.
func NewSMTPMailer(cfg config.Config, log *slog.Logger) (*devices.SMTPMailer, error) {
	m, err := devices.NewSMTPMailer(devices.SMTPConfig{
		Host:        cfg.SMTP.Host,
		Port:        cfg.SMTP.Port,
		TLS:         devices.TLSPolicy(cfg.SMTP.TLS),
		ImplicitTLS: cfg.SMTP.ImplicitTLS,
		Username:    cfg.SMTP.Username,
		Password:    cfg.SMTP.Password,
		HELO:        cfg.SMTP.HELO,
		Timeout:     cfg.SMTP.Timeout,
		Logger:      log,
	})
	if err != nil {
		return nil, fmt.Errorf("smtp: %w", err)
	}
	return m, nil
}
