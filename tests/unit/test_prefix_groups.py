"""Groups of context prefixes (``prefix_groups``, issue 16): ROME and R-ROME default to the reference ROME's
``context_template_length_params`` ``[[5, 10], [10, 10]]`` (21 prompts with the empty one); MEMIT's family keeps one
group of ``n_prefixes`` × ``prefix_length``; setting ``n_prefixes`` / ``prefix_length`` alone clears the groups."""
from __future__ import annotations

import pytest

from editlens.edit import edit, locate
from editlens.edit.base import get_method
from editlens.errors import HParamsError


def _hp(method: str):
    return get_method(method).hparams_class()


def test_rome_defaults_to_the_reference_templates_memit_to_one_group():
    for m in ("rome", "r-rome"):
        hp = _hp(m)
        assert hp.prefix_groups == [[5, 10], [10, 10]]
        assert hp.prefix_plan() == [(5, 10), (10, 10)]
    for m in ("memit", "alphaedit", "emmet", "pmet"):
        hp = _hp(m)
        assert hp.prefix_groups == []
        assert hp.prefix_plan() == [(hp.prefix_length, hp.n_prefixes)] == [(10, 5)]
    assert _hp("memit").replace(n_prefixes=0).prefix_plan() == []


def test_n_prefixes_or_prefix_length_alone_clears_the_groups():
    hp = _hp("rome")
    assert hp.replace(n_prefixes=2).prefix_plan() == [(10, 2)]
    assert hp.replace(prefix_length=4).prefix_plan() == [(4, 5)]
    both = hp.replace(n_prefixes=2, prefix_groups=[[3, 1], [4, 2]])
    assert both.prefix_plan() == [(3, 1), (4, 2)]
    # a recorded set of hyperparameters (a spec, a saved run) round-trips: every key is given at once
    assert hp.replace(**hp.to_dict()) == hp
    assert both.replace(**both.to_dict()) == both


@pytest.mark.parametrize("bad", [[[5]], [[0, 1]], [[5, 0]], [[True, 1]], [[5, 1.5]], "5:10", [5, 10]])
def test_bad_prefix_groups_name_the_key(bad):
    with pytest.raises(HParamsError, match="prefix_groups"):
        _hp("rome").replace(prefix_groups=bad)


def test_tiny_models_keep_their_small_single_group(tiny_llama):
    hp = get_method("rome").hparams_class.for_model(tiny_llama)
    assert hp.prefix_groups == [] and hp.prefix_plan() == [(hp.prefix_length, hp.n_prefixes)]


def test_planned_prefixes_are_the_groups_one_after_the_other(tiny_llama, tmp_path):
    lm = tiny_llama
    one = locate.planned_prefixes(lm, [(4, 2)], seed=3, cache_dir=tmp_path)
    assert one == locate.cached_prefixes(lm, 2, 4, seed=3, cache_dir=tmp_path)  # one group: unchanged
    two = locate.planned_prefixes(lm, [(3, 2), (5, 3)], seed=3, cache_dir=tmp_path)
    assert len(two) == 1 + 2 + 3 and two[0] == ""
    assert two[1:3] == locate.context_prefixes(lm, 2, 3, seed=3)[1:]
    assert two[3:] == locate.context_prefixes(lm, 3, 5, seed=4)[1:]  # group g samples with seed + g
    assert locate.planned_prefixes(lm, [], seed=3, cache_dir=tmp_path) == [""]


def test_a_rome_edit_optimises_over_every_group(tiny_llama, monkeypatch, tmp_path):
    from editlens.data.schema import EditCase, Probe, Rewrite

    seen = []
    real = locate.compute_keys

    def spy(lm, layer, requests, prefixes=("",), **kw):
        seen.append(list(prefixes))
        return real(lm, layer, requests, prefixes, **kw)

    monkeypatch.setattr(locate, "compute_keys", spy)
    case = EditCase(case_id="c0", rewrite=Rewrite(prompt="{} plays", subject="Danielle Darrieux", target_new="jazz",
                                                  target_true="chess"))
    e = edit(tiny_llama, [case], "rome", progress=False, prefix_groups=[[2, 2], [3, 1]], stats_dir=str(tmp_path))
    try:
        assert seen and {len(p) for p in seen} <= {1 + 2 + 1, 1}  # k̄ over every prefix; k₀ unprefixed
        assert e.hparams.prefix_groups == [[2, 2], [3, 1]]
    finally:
        e.undo()
    # sampled from the unedited model (the edited one has another fingerprint, so another cache entry)
    assert seen[0] == locate.planned_prefixes(tiny_llama, [(2, 2), (3, 1)], seed=0, cache_dir=tmp_path,
                                              start="document")


# ------------------------------------------------------------------ where the sampled prefixes start (prefix_start)
def test_rome_samples_after_the_document_start_memit_after_the_seed_words():
    for m in ("rome", "r-rome"):
        assert _hp(m).prefix_start == "document"
    for m in ("memit", "alphaedit", "emmet", "pmet"):
        assert _hp(m).prefix_start == "words"
    with pytest.raises(HParamsError, match="prefix_start"):
        _hp("rome").replace(prefix_start="bos")


class _Tok:
    """A stand-in tokenizer: ``vocab`` maps whole special-token texts to one id; anything else is one id per
    character."""

    def __init__(self, vocab, eos=None, bos=None):
        self.vocab, self.eos_token, self.bos_token, self.unk_token_id = vocab, eos, bos, None

    def __call__(self, text, add_special_tokens=True):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[self.vocab[text]] if text in self.vocab else [ord(c) for c in text])


def test_document_start_is_endoftext_else_eos_else_bos():
    from editlens.errors import MethodError

    assert locate.document_start(_Tok({"<|endoftext|>": 0}, eos="</s>")) == "<|endoftext|>"
    assert locate.document_start(_Tok({}, eos="</s>", bos="<s>")) == "</s>"
    assert locate.document_start(_Tok({}, bos="<s>")) == "<s>"
    with pytest.raises(MethodError, match="prefix_start='words'"):
        locate.document_start(_Tok({}))


def test_document_prefixes_are_what_the_reference_keeps(tiny_llama):
    """length − 1 tokens sampled after the start text, the start text dropped, NFKD and "\\n\\n" → " " as the
    reference cleans them, braces removed, + ". " (checked against sample_texts itself)."""
    import unicodedata

    lm = tiny_llama
    got = locate.context_prefixes(lm, 3, 4, seed=5, start="document")
    head = locate.document_start(lm.tokenizer)
    raw = locate.sample_texts(lm, [head] * 3, 3, seed=5, temperature=1.0, top_k=5)
    want = ["", *(unicodedata.normalize("NFKD", t[len(head):]).replace("\n\n", " ").replace("{", "")
                  .replace("}", "") + ". " for t in raw)]
    assert got == want
    assert all(t.startswith(head) for t in raw)
    words = locate.context_prefixes(lm, 3, 4, seed=5)
    assert words != got and words[1].startswith(locate.PREFIX_SEEDS[0])
    with pytest.raises(Exception, match="start must be one of"):
        locate.context_prefixes(lm, 3, 4, start="nope")


def test_document_prefixes_have_their_own_cache_entry(tiny_llama, tmp_path):
    lm = tiny_llama
    w = locate.cached_prefixes(lm, 2, 4, seed=1, cache_dir=tmp_path)
    d = locate.cached_prefixes(lm, 2, 4, seed=1, cache_dir=tmp_path, start="document")
    assert w != d
    names = sorted(x.name for x in tmp_path.glob("prefixes-*.json"))
    assert len(names) == 2 and any(n.endswith("-s1.json") for n in names) and any(n.endswith("-s1-document.json")
                                                                                   for n in names)
    assert locate.cached_prefixes(lm, 2, 4, seed=1, cache_dir=tmp_path, start="document") == d
