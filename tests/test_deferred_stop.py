"""Deferred stop checks (emit/deferred_stop.py): off by default; when enabled, transformers' DeferredStopCheck is
allowed on CUDA devices inside the block only, under transformers' own conditions, and its rule comes back after.
The GPU behaviour (same tokens, one undone step after an EOS) is tests/gpu/test_emit_cuda.py's."""

from __future__ import annotations

import pytest
import torch
from moe_compile.emit.deferred_stop import ENABLE_ENV, deferring_stop_checks

DeferredStopCheck = getattr(pytest.importorskip("transformers.generation.utils"), "DeferredStopCheck", None)
if DeferredStopCheck is None:
    pytest.skip("this transformers has no DeferredStopCheck (5.17 and later do)", allow_module_level=True)

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class _Cache:
    def __init__(self, croppable: bool):
        self.is_croppable = croppable


def test_off_by_default_leaves_transformers_rule(monkeypatch):
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    original = DeferredStopCheck.__dict__["is_supported"]
    with deferring_stop_checks() as deferring:
        assert not deferring
        assert DeferredStopCheck.__dict__["is_supported"] is original
        assert not DeferredStopCheck.is_supported(CUDA, None, False, False)


def test_enabled_defers_on_cuda_under_transformers_conditions(monkeypatch):
    monkeypatch.setenv(ENABLE_ENV, "1")
    original = DeferredStopCheck.__dict__["is_supported"]
    with deferring_stop_checks() as deferring:
        assert deferring
        assert DeferredStopCheck.is_supported(CUDA, None, False, False)
        assert DeferredStopCheck.is_supported(CUDA, _Cache(croppable=False), False, False)  # cache not handed back
        assert DeferredStopCheck.is_supported(CUDA, _Cache(croppable=True), True, False)
        assert not DeferredStopCheck.is_supported(CUDA, _Cache(croppable=False), True, False)  # cannot undo in it
        assert not DeferredStopCheck.is_supported(CUDA, None, False, True)  # assistant models: never
        assert not DeferredStopCheck.is_supported(CPU, None, False, False)  # other devices: transformers' rule
        with deferring_stop_checks():  # nested: the outer block restores
            pass
        assert DeferredStopCheck.is_supported(CUDA, None, False, False)
    assert DeferredStopCheck.__dict__["is_supported"] is original
    assert not DeferredStopCheck.is_supported(CUDA, None, False, False)


def test_rule_restored_when_the_call_fails(monkeypatch):
    monkeypatch.setenv(ENABLE_ENV, "1")
    original = DeferredStopCheck.__dict__["is_supported"]
    with pytest.raises(RuntimeError), deferring_stop_checks():
        raise RuntimeError("generate failed")
    assert DeferredStopCheck.__dict__["is_supported"] is original
