package faulttest

import (
	"testing"

	"github.com/docstate/docstate/internal/couchtest"
)

func TestMain(m *testing.M) { couchtest.Main(m) }
