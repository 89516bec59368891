"""The package version, in one place (the package and its tracer scope read it)."""

VERSION = "0.1.0"
