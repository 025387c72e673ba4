"""Holds the `evaluate` metric script; a package only so that it ships in the wheel."""
