"""The public names later code and users rely on."""
from __future__ import annotations

import editlens


def test_public_names_exist_and_are_callable():
    import editlens.evaluate.system  # noqa: F401 - importing submodules must not shadow the callables
    import editlens.edit.base  # noqa: F401

    assert callable(editlens.load_model) and callable(editlens.load_cases)
    assert callable(editlens.edit) and callable(editlens.evaluate)
    assert editlens.edit.edit_sequential is not None and editlens.evaluate.Results is not None
    assert issubclass(editlens.errors.EditlensError, Exception)
    assert editlens.ModelSystem is editlens.evaluate.ModelSystem


def test_edit_and_evaluate_through_top_level(tiny_llama):
    from editlens.data.schema import Rewrite, make_case

    cases = [make_case("0", Rewrite("The capital of {} is", "Japan", "Seoul", "Tokyo"))]
    base = editlens.ModelSystem(tiny_llama)
    e = editlens.edit(tiny_llama, cases, method="memit", layers=[1, 2], v_num_grad_steps=2,
                      stats_n_samples=8)
    res = editlens.evaluate(base, cases, base=base, metrics=["kl"], progress=False)
    assert set(res.to_pandas().columns) == {"case_id", "probe_kind", "metric", "value"}
    e.undo()


def test_every_cli_command_is_registered_and_explains_itself():
    from click.testing import CliRunner

    from editlens.cli.main import _COMMANDS, cli

    assert len(cli.commands) == len(_COMMANDS)
    runner = CliRunner()
    for name, cmd in cli.commands.items():
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert len(res.output.strip().splitlines()) > 3, name
