"""Helpers importable by Ray worker processes during tests (tests/ is on sys.path)."""
