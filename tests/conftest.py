"""Shared pytest settings: tiny model configs and the `slow` marker (slow tests still run in CI)."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower end-to-end tests (still run in CI)")
