"""The examples in the package's docstrings run and print what they show (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gnn_transformer

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(gnn_transformer.__path__, "gnn_transformer."))


@pytest.mark.parametrize("name", ["gnn_transformer"] + MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
