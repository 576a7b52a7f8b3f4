"""The second-moment statistics cache runs no code and never feeds a damaged matrix to an edit (issue 13)."""
from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

import editlens
from editlens.edit.stats import second_moment

DOCS = ["the cat sat on the mat", "a dog ran in the park today"]


class _Payload:
    """Unpickling this object would run ``touch <marker>`` (as a hostile cache file would)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _entry(tmp_path):
    files = sorted(tmp_path.glob("mom2-*.pt"))
    assert len(files) == 1
    return files[0]


def _tamper_pickle(path, marker):
    # a torch.save-compatible zip would be refused the same way; a raw pickle is the classic attack
    with open(path, "wb") as f:
        pickle.dump({"mom2": _Payload(marker)}, f)


@pytest.mark.parametrize("damage", ["code", "shape", "nan", "layer", "garbage"])
def test_damaged_stats_entry_is_recomputed_with_a_warning(tmp_path, damage):
    lm = editlens.load_model("tiny-gpt2")
    clean = second_moment(lm, [1], corpus=DOCS, cache_dir=tmp_path, progress=False)[1]
    path = _entry(tmp_path)
    marker = tmp_path / "PWNED"
    good = torch.load(path, weights_only=True)
    if damage == "code":
        _tamper_pickle(path, marker)
    elif damage == "shape":
        torch.save({**good, "mom2": torch.eye(3)}, path)
    elif damage == "nan":
        torch.save({**good, "mom2": good["mom2"] * float("nan")}, path)
    elif damage == "layer":
        torch.save({**good, "layer": 0}, path)
    else:
        path.write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match=f"statistics cache file .*{path.name}.* damaged"):
        again = second_moment(lm, [1], corpus=DOCS, cache_dir=tmp_path, progress=False)[1]
    assert not marker.exists()
    assert torch.equal(again, clean)
    # the entry was replaced: the next read is a clean hit (no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = second_moment(lm, [1], corpus=DOCS, cache_dir=tmp_path, progress=False)[1]
    assert torch.equal(third, clean)
