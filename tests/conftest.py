"""Fixtures every test folder may use: `task_identity` (tests_support/grids.py)."""

pytest_plugins = ["tests_support.grids"]
