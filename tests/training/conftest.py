"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from kerasnuc import registry
from tests.training.tiny_method import NAME, TINY_METHOD


@pytest.fixture
def tiny_method(monkeypatch):
    """Registers the narrow ``tiny_conic`` stand-in method (:mod:`tests.training.tiny_method`)."""
    monkeypatch.setitem(registry.METHODS, NAME, TINY_METHOD)
    return TINY_METHOD
