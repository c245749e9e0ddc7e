"""Shared libraries: code several components use, one owner each (DESIGN.md §2)."""
