"""The version of biaslab (one place; the package root, figures and reports read it)."""

__version__ = "0.1.0"
