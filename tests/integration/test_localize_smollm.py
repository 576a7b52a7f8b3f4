"""Causal tracing on SmolLM2 (short: one CounterFact case, two noise draws): `editlens trace` writes the per-case
heatmap, the average figure and the CSVs, and the tracing identity holds on the real model."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from editlens.cli.main import cli


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread avoids barrier stalls on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.mark.integration
def test_trace_cli_on_counterfact_sample(shared_data_dir, tmp_path, smollm):
    out = tmp_path / "trace"
    r = CliRunner().invoke(cli, ["trace", "--model", "smollm2-135m", "--data",
                                 str(shared_data_dir / "counterfact_sample.json"), "--limit", "1", "--samples", "2",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in out.glob("trace_*.png"))
    assert len(pngs) == 1 and (out / "average_hidden.png").stat().st_size > 5000
    for p in [out / pngs[0], out / "average_hidden.png"]:
        assert p.read_bytes()[:4] == b"\x89PNG"
    cases = pd.read_csv(out / "cases.csv")
    rows = pd.read_csv(out / "traces.csv")
    avg = pd.read_csv(out / "average.csv")
    assert len(cases) == 1 and len(avg) == 6 * smollm.n_layers
    c = cases.iloc[0]
    L, T = smollm.n_layers, rows.token_index.max() + 1
    assert len(rows) == T * L
    # the identity: the last token's last hidden state restored gives back the clean probability ...
    last = rows[(rows.token_index == T - 1) & (rows.layer == L - 1)].iloc[0]
    assert last.score == pytest.approx(c.p_clean, rel=1e-4)
    # ... and the corruption really lowers it (the sample's first fact is known to SmolLM2)
    assert c.p_clean - c.p_corrupt > 0.05
    # a state the last position cannot see (first token, last layer) has no effect
    first = rows[(rows.token_index == 0) & (rows.layer == L - 1)].iloc[0]
    assert first.score == pytest.approx(c.p_corrupt, rel=1e-4)
