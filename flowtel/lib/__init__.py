"""Shared libraries of flowtel: one owner each; components depend on them, never on each other."""
