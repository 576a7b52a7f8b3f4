"""Full-size files: a 20k-record CounterFact-schema file loads (speed is measured in benchmarks, not here)."""
from __future__ import annotations

import json

from editlens.data import load_cases


def _record(i: int) -> dict:
    s = f"Subject{i}"
    return {
        "case_id": i, "pararel_idx": i,
        "requested_rewrite": {"prompt": "{} is located in the country of", "relation_id": "P17",
                              "target_new": {"str": f"New{i % 97}", "id": "Q1"},
                              "target_true": {"str": f"Old{i % 89}", "id": "Q2"}, "subject": s},
        "paraphrase_prompts": [f"Some context {i}. {s} lies in", f"{s} can be found in"],
        "neighborhood_prompts": [f"Neighbour{i}_{j} is located in the country of" for j in range(10)],
        "attribute_prompts": [f"Attr{i}_{j} is located in the country of" for j in range(10)],
        "generation_prompts": [f"{s} is famous for" for _ in range(10)],
        "extra_field_we_ignore": {"x": [1, 2, 3]},
    }


def test_load_20k_counterfact(tmp_path):
    path = tmp_path / "big_counterfact.json"
    path.write_text(json.dumps([_record(i) for i in range(20_000)]))
    cases = load_cases(path)
    assert len(cases) == 20_000
    assert cases[12345].rewrite.subject == "Subject12345"
    assert cases[12345].rewrite.target_new == f"New{12345 % 97}"
    assert len(cases[-1].probes_of("neighborhood")) == 10
    sub = load_cases(path, sample=100, seed=0)
    assert len(sub) == 100 and len({c.case_id for c in sub}) == 100
    assert load_cases(path, sample=100, seed=0) == sub  # deterministic for a seed
