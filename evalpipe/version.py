"""The evalpipe version, written into every run's config.yaml and registry entry."""

__version__ = "0.1.0"
