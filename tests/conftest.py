"""Shared pytest fixtures.

* ``shared_data_dir``: the sample datasets: ``$EDITLENS_SHARED_DATA``, else ``../shared/data`` beside the
  repository, else the byte-identical copies shipped in the package (``editlens/resources/data``; a test checks
  that they match ``../shared/data`` when it is there). Never skipped: a fresh clone anywhere runs the loader tests.
* ``smollm``: the embedded SmolLM2-135M-Instruct, loaded once per session (integration tests).
* ``tiny_llama`` / ``tiny_gpt2``: randomly initialised tiny models built from a config (unit tests).
* :func:`noisy_tiny_llama`: a tiny model with Gaussian noise on its MLP output projections (an "edited" model).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGED_DATA = REPO / "editlens" / "resources" / "data"


def _shared_data() -> Path | None:
    env = os.environ.get("EDITLENS_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data", PACKAGED_DATA]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    d = _shared_data()
    if d is None:
        raise FileNotFoundError(f"no sample data: set EDITLENS_SHARED_DATA, or restore {PACKAGED_DATA}")
    return d


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def smollm():
    import editlens

    return editlens.load_model("smollm2-135m")


@pytest.fixture()
def tiny_llama():
    import editlens

    return editlens.load_model("tiny-llama")


@pytest.fixture()
def tiny_gpt2():
    import editlens

    return editlens.load_model("tiny-gpt2")


def noisy_tiny_llama(seed: int, scale: float = 0.05):
    """A fresh ``tiny-llama`` with ``scale``-Gaussian noise (seeded) added to every MLP ``down_proj`` weight and the
    state pushed, standing in for an edited model in evaluator tests."""
    import editlens

    lm = editlens.load_model("tiny-llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                p.add_(scale * torch.randn(p.shape, generator=g))
    lm.push_state("test-noise")
    return lm


def shipped_methods() -> list[str]:
    """Registered methods that editlens itself ships (classes in ``editlens.*`` modules).

    Tests and doc examples register throw-away methods (``_test_add``, the docs' ``toyedit``) into the same
    process-wide registry; tests that walk "every method" must not depend on which of those ran first.
    """
    from editlens.edit import get_method, registered_methods

    return [m for m in registered_methods() if get_method(m).__module__.startswith("editlens.")]


def shipped_metrics() -> list[str]:
    """Registered metrics that editlens itself ships (see :func:`shipped_methods`)."""
    from editlens.evaluate import registered_metrics

    return [m for m, cls in registered_metrics().items() if cls.__module__.startswith("editlens.")]


_TRAINED: dict = {}


def trained_for(method: str, lm) -> dict:
    """``{"trained": <editor>}`` for a trained method (MEND, MALMEN, KE, SERAC: a small editor trained once per model
    with the method's ``contract_train_overrides()`` on :func:`editlens.testing.edit_cases`), ``{}`` otherwise; for
    tests that edit with every shipped method."""
    from editlens.edit import get_method
    from editlens.edit.trained import TrainableEditor, train

    cls = get_method(method)
    if not issubclass(cls, TrainableEditor):
        return {}
    key = (method, lm.base_fingerprint)
    if key not in _TRAINED:
        from editlens.testing import edit_cases

        _TRAINED[key] = train(method, lm, edit_cases(3), progress=False, **cls().contract_train_overrides())
    return {"trained": _TRAINED[key]}
