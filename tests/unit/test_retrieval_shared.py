"""One encoder per (spec, device) and process: IKE, SCR and SERAC share it instead of loading it for every edit."""
from __future__ import annotations

from editlens.edit import retrieval
from editlens.edit.retrieval import HashingEncoder, shared_encoder


def test_shared_encoder_is_built_once_per_spec_and_device(monkeypatch):
    built = []

    def fake_make(spec, device="cpu"):
        built.append((spec, device))
        return HashingEncoder(16)

    monkeypatch.setattr(retrieval, "_SHARED", {})
    monkeypatch.setattr(retrieval, "make_encoder", fake_make)
    a = shared_encoder("hashing:16")
    b = shared_encoder("hashing:16", device="cpu")
    c = shared_encoder("hashing:16", device="meta")
    assert a is b and c is not a
    assert built == [("hashing:16", "cpu"), ("hashing:16", "meta")]


def test_ike_and_scr_editors_reuse_one_encoder(tiny_llama):
    import editlens

    cases = editlens.synthetic_cases(2, seed=0)
    e1 = editlens.edit(tiny_llama, cases[:1], method="ike", retriever="hashing:32")
    e2 = editlens.edit(tiny_llama, cases[1:], method="scr", retriever="hashing:32")
    try:
        assert e1.system.facts.encoder is e2.system.memory.encoder is shared_encoder("hashing:32")
    finally:
        e2.undo()
        e1.undo()
