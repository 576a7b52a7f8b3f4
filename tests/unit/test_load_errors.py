"""load_model: bad names, devices, dtypes and damaged checkpoints give an EditlensError that says what to fix,
quickly (no hub wait for a name that cannot be a hub id), and never advise unsafe unpickling."""
from __future__ import annotations

import time

import pytest
import torch

import editlens
from editlens.errors import EditlensError, MetricError, ModelLoadError
from editlens.lm.load import load_model


def _no_unsafe_advice(e: BaseException) -> None:
    text = str(e)
    assert "weights_only=False" not in text and "weights_only = False" not in text
    assert "Traceback" not in text


def test_mistyped_builtin_name_fails_fast_with_suggestion(monkeypatch):
    # even with the hub "online" (no HF_HUB_OFFLINE), a name that is no path and no org/name id must not wait
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("tiny_llama", device="cpu")
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"took {elapsed:.1f}s"
    msg = str(e.value)
    assert "'tiny-llama'" in msg and "did you mean" in msg
    assert "tiny_llama" in msg


def test_mistyped_embedded_name_suggests(monkeypatch):
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("smolm2-135m", device="cpu")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("SmolLM2-135M", device="cpu")


def test_missing_local_path_is_reported_as_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model("./models/nope", device="cpu")


def test_hub_id_offline_does_not_retry(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("no-such-org-xyz/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert "offline" in str(e.value)
    _no_unsafe_advice(e.value)


@pytest.mark.parametrize("device", ["meta", "gpu7", "cuda:x", "cpu:0:1", ""])
def test_bad_device(device):
    with pytest.raises(ModelLoadError, match="device") as e:
        load_model("tiny-llama", device=device)
    _no_unsafe_advice(e.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, "int8", "float8", 3])
def test_non_float_dtype(dtype):
    with pytest.raises(ModelLoadError, match="dtype") as e:
        load_model("tiny-llama", device="cpu", dtype=dtype)
    assert "float32" in str(e.value)


def test_evaluate_metrics_none(tiny_llama):
    from editlens.data import synthetic_cases
    from editlens.evaluate import ModelSystem, evaluate

    sys_ = ModelSystem(tiny_llama)
    for bad in (None, 3, [None], [""]):
        with pytest.raises(MetricError, match="metric"):
            evaluate(sys_, synthetic_cases(2), base=sys_, metrics=bad, progress=False)


def _save_tiny(d):
    lm = load_model("tiny-llama", device="cpu")
    lm.model.save_pretrained(str(d))
    lm.tokenizer.save_pretrained(str(d))
    return d


def test_corrupt_pytorch_model_bin(tmp_path):
    d = _save_tiny(tmp_path / "ckpt")
    for f in d.glob("*.safetensors"):  # keep only a (corrupt) pickle-format weights file
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"this is not a torch checkpoint" * 10)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d), device="cpu")
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "corrupt" in msg.lower()
    _no_unsafe_advice(e.value)


def test_directory_without_config(tmp_path):
    d = _save_tiny(tmp_path / "ckpt")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d), device="cpu")
    msg = str(e.value)
    assert "config.json" in msg and "sentencepiece" not in msg.lower()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(empty), device="cpu")


def test_all_are_editlens_errors():
    assert issubclass(ModelLoadError, EditlensError) and issubclass(MetricError, EditlensError)
    assert editlens.load_model is not None


def test_hub_id_unreachable_hub_uses_cache_only(monkeypatch, tmp_path):
    import editlens.lm.load as L

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(L, "_hub_reachable", lambda timeout=2.0: False)
    seen = {}
    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def spy(name, *a, **kw):
        seen.update(kw)
        return real(name, *a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable") as e:
        load_model("no-such-org-xyz/tiny_llama", device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert seen.get("local_files_only") is True
    assert "'tiny-llama'" in str(e.value)  # the close built-in name is suggested here too
