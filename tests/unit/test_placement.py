"""A model spread over devices with accelerate (``load_model(..., device_map=...)``), checked on the CPU.

The tiny LLaMA is dispatched with layers 0 and 3 on ``cpu`` (accelerate hooks, weights resident) and layers 1-2 on
``disk`` (offloaded: ``meta`` parameters, values in accelerate's weights map backed by an offload folder). Every
edit, statistic and evaluation must equal the undispatched model's bit for bit, and undo must restore the offloaded
copies (the ones the next forward reads) bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import editlens
from editlens.data.schema import Rewrite, make_case
from editlens.edit import edit, edit_sequential
from editlens.edit.stats import second_moment
from editlens.errors import MethodError, ModelLoadError
from editlens.lm import placement

DMAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
DOCS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and a large city.",
        "Alice Smith lives in a small town near the sea.", "Numbers: one two three four five six seven."]


@pytest.fixture(autouse=True, scope="module")
def _stats_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITLENS_STATS_DIR", str(tmp_path_factory.getbasetemp() / "stats"))
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(undispatched, dispatched) tiny LLaMA, shared by the module: every test undoes its edits."""
    ref = editlens.load_model("tiny-llama")
    offload = tmp_path_factory.mktemp("placement") / "offload"
    lm = editlens.load_model("tiny-llama", device_map=DMAP, offload_dir=offload)
    lm.offload_dir = offload  # for test_dispatch_places_and_offloads
    return ref, lm


def _cases(n=2):
    subjects = ["Alice Smith", "Bob Jones", "Carol White"]
    return [make_case(str(i), Rewrite("{} lives in the city of", subjects[i], "Paris")) for i in range(n)]


def _values(lm) -> dict[str, torch.Tensor]:
    """Every tensor's current value, offloaded ones read from accelerate's weights map (cloned)."""
    return {k: v.detach().clone() for k, v in placement.state_tensors(lm.model)}


def _logits(lm) -> torch.Tensor:
    enc = lm.tokenizer(["Alice Smith lives in the city of", "Bob Jones works"], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        return lm.model(**enc.to(lm.device)).logits


def test_dispatch_places_and_offloads(pair):
    ref, lm = pair
    assert lm.device_map == DMAP and lm.device == torch.device("cpu")
    down = lm.module("model.layers.1.mlp.down_proj")
    assert down.weight.device.type == "meta" and placement.is_offloaded(down)  # the parameter holds no data
    assert not placement.is_offloaded(lm.module("model.layers.0.mlp.down_proj"))
    assert (lm.offload_dir / "index.json").is_file()  # accelerate wrote layers 1-2 there
    assert lm.base_fingerprint == ref.base_fingerprint  # read through the weights map, placement-free
    ref_values = _values(ref)
    values = _values(lm)
    assert values.keys() == ref_values.keys()
    assert all(torch.equal(values[k], ref_values[k]) for k in values)
    assert torch.equal(_logits(lm), _logits(ref))


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_locate_then_edit_equals_undispatched_and_undoes_offloaded_copies(pair, method):
    ref, lm = pair
    before = _values(lm)
    e_ref, e = edit(ref, _cases(2), method), edit(lm, _cases(2), method)
    layers = e.diagnostics["layers"]
    assert layers == e_ref.diagnostics["layers"] and set(layers) <= {1, 2}  # the edited layers are offloaded
    after, after_ref = _values(lm), _values(ref)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed == [f"model.layers.{l}.mlp.down_proj.weight" for l in layers]
    assert all(torch.equal(after[k], after_ref[k]) for k in after)  # the same ΔW, bit for bit
    assert torch.equal(_logits(lm), _logits(ref))  # the forward reads the edited offloaded copy
    assert e.system.fingerprint == e_ref.system.fingerprint
    e.undo()
    e_ref.undo()
    restored = _values(lm)
    assert all(torch.equal(restored[k], before[k]) for k in before)
    assert lm.weights_fingerprint() == lm.base_fingerprint and lm.fingerprint == lm.base_fingerprint
    assert torch.equal(_logits(lm), _logits(ref))


def test_sequential_run_and_pinned_base_system(pair):
    ref, lm = pair
    before, base = _values(lm), editlens.ModelSystem(lm)
    base_logp = base.teacher_forced(["Alice Smith lives in the city of"], [" Paris"])
    run = edit_sequential(lm, _cases(3), "rome", batch_size=1)
    run_ref = edit_sequential(ref, _cases(3), "rome", batch_size=1)
    assert torch.equal(_logits(lm), _logits(ref))
    assert repr(run.system.teacher_forced(["Alice Smith lives in the city of"], [" Paris"])) != repr(base_logp)
    # the base system swaps the offloaded originals in for its call and the edited values back out
    again = base.teacher_forced(["Alice Smith lives in the city of"], [" Paris"])
    assert repr(again) == repr(base_logp)
    assert torch.equal(_logits(lm), _logits(ref))
    run.undo()
    run_ref.undo()
    assert all(torch.equal(v, before[k]) for k, v in _values(lm).items())


def test_ft_on_a_resident_layer_and_refused_on_an_offloaded_one(pair):
    ref, lm = pair
    before = _values(lm)
    e_ref = edit(ref, _cases(1), "ft", layers=[3], steps=5)
    e = edit(lm, _cases(1), "ft", layers=[3], steps=5)
    after, after_ref = _values(lm), _values(ref)
    assert not torch.equal(after["model.layers.3.mlp.down_proj.weight"],
                           before["model.layers.3.mlp.down_proj.weight"])
    # layers 1-2 are offloaded: gradients flow through accelerate's per-forward copies; same float32 sums
    assert all(torch.equal(after[k], after_ref[k]) for k in after)
    e.undo()
    e_ref.undo()
    assert all(torch.equal(v, before[k]) for k, v in _values(lm).items())
    with pytest.raises(MethodError, match=r"cannot fine-tune offloaded weights \(model\.layers\.1\.mlp\.down_proj"):
        edit(lm, _cases(1), "ft", layers=[1], steps=5)
    assert all(torch.equal(v, before[k]) for k, v in _values(lm).items())


def test_a_method_that_reads_weights_directly_is_refused(pair):
    _, lm = pair
    with pytest.raises(MethodError, match=r"method 'kn' cannot edit a model with offloaded weights.*rome"):
        edit(lm, _cases(1), "kn")


def test_second_moment_equals_undispatched(pair):
    ref, lm = pair
    a = second_moment(ref, [1, 3], corpus=DOCS, use_cache=False, progress=False, out_dtype=torch.float64)
    b = second_moment(lm, [1, 3], corpus=DOCS, use_cache=False, progress=False, out_dtype=torch.float64)
    assert a.keys() == b.keys() and all(torch.equal(a[l], b[l]) for l in a)
    assert float(a[1].abs().sum()) > 0


def test_evaluate_runs_and_equals_undispatched(pair):
    ref, lm = pair
    cases = _cases(2)
    rows = []
    for model in (ref, lm):
        e = edit(model, cases, "rome")
        res = editlens.evaluate(e.system, cases, base=editlens.ModelSystem(model), metrics="gt", progress=False,
                                cache=False)
        rows.append(res.rows)
        e.undo()
    assert rows[0] and rows[0] == rows[1]


@pytest.mark.parametrize("dmap, match", [
    ({**DMAP, "model.layers.1": "cuda:3"}, r"device_map\['model.layers.1'\] = 'cuda:3': no such device"),
    ({**DMAP, "model.layers.1": 7}, r"device_map\['model.layers.1'\] = 7: no such device"),
    ({**DMAP, "model.layers.1": "gpu"}, r"device_map\['model.layers.1'\] = 'gpu' is not a device"),
    ({**DMAP, "model.layer.9": "cpu"}, r"device_map key 'model.layer.9' names no module"),
    ({k: v for k, v in DMAP.items() if k != "lm_head"}, r"places no device for the parameters lm_head.weight"),
    ("everywhere", r"invalid device_map 'everywhere'"),
])
def test_bad_device_maps_name_the_entry(dmap, match):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPUs the map names")
    with pytest.raises(ModelLoadError, match=match):
        editlens.load_model("tiny-llama", device_map=dmap)


def test_device_and_device_map_together_are_refused():
    with pytest.raises(ModelLoadError, match="either device='cpu' or device_map"):
        editlens.load_model("tiny-llama", "cpu", device_map=DMAP)


def test_auto_map_on_a_cpu_machine_runs(tmp_path):
    lm = editlens.load_model("tiny-llama", device_map="auto", dtype="float32")
    ref = editlens.load_model("tiny-llama")
    assert set(lm.device_map.values()) <= {"cpu", 0}
    assert torch.equal(_logits(lm).cpu(), _logits(ref))


def test_set_weight_and_get_weight_round_trip(pair):
    _, lm = pair
    name = "model.layers.2.mlp.down_proj"
    w0 = placement.get_weight(lm, name).clone()
    placement.set_weight(lm, name, w0 * 2)
    assert torch.equal(placement.read_offloaded(lm.module(name)), w0 * 2)
    with pytest.raises(ModelLoadError, match="does not fit"):
        placement.set_weight(lm, name, w0.T)
    placement.set_weight(lm, name, w0)
    assert torch.equal(placement.get_weight(lm, name), w0)


def test_save_pretrained_of_an_edit_on_offloaded_layers(pair, tmp_path):
    """An edit of offloaded layers saves as a plain checkpoint: transformers writes the offloaded values from
    accelerate's weights map, and the read-back check compares them with those values (not with the ``meta``
    placeholders). The reloaded weights are the edited ones, bit for bit, and equal the undispatched model's edit."""
    ref, lm = pair
    before = _values(lm)
    e_ref, e = edit(ref, _cases(1), "memit"), edit(lm, _cases(1), "memit")
    try:
        edited, edited_ref = _values(lm), _values(ref)
        layers = e.diagnostics["layers"]
        assert layers and set(layers) <= {1, 2}  # the edited layers are offloaded
        with pytest.warns(UserWarning, match="offloaded"):  # transformers' note on saving offloaded modules
            saved = e.save_pretrained(tmp_path / "edited")
        back = editlens.load_model(str(saved))
        sd = back.model.state_dict()
        assert set(sd) <= set(edited)
        assert all(torch.equal(sd[k], edited[k]) and torch.equal(sd[k], edited_ref[k]) for k in sd)
        changed = sorted(k for k in sd if not torch.equal(sd[k], before[k]))
        assert changed == [f"model.layers.{l}.mlp.down_proj.weight" for l in layers]  # the edit, saved
    finally:
        e.undo()
        e_ref.undo()
