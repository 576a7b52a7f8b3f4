"""The ``editlens demo``: what the embedded model knows, then an edit measured every way."""
from __future__ import annotations

from pathlib import Path

import click


def show_answers(lm, cases) -> None:
    """Print greedy answers and target probabilities of the rewrite prompts."""
    import math

    from editlens.lm import ops

    prompts = [c.rewrite.text for c in cases]
    answers = ops.generate(lm, prompts, max_new_tokens=8)
    tf_true = ops.teacher_forced(lm, prompts, [c.rewrite.target_true or c.rewrite.target_new for c in cases])
    tf_new = ops.teacher_forced(lm, prompts, [c.rewrite.target_new for c in cases])
    click.echo(f"{'prompt':<48} {'greedy answer':<22} {'P(true)':>8} {'P(new)':>8}")
    for c, a, t, n in zip(cases, answers, tf_true, tf_new):
        click.echo(f"{c.rewrite.text[:47]:<48} {a.strip()[:21]:<22} {math.exp(t.total_logprob):8.3f} "
                   f"{math.exp(n.total_logprob):8.4f}")


def run_demo(model: str, out: Path, quick: bool = True) -> None:
    import editlens
    from editlens.cli.basic import sample_data_path

    click.echo(f"loading {model} ...")
    lm = editlens.load_model(model)
    click.echo(f"  {type(lm.model).__name__}, {lm.n_layers} layers, d={lm.d_model}, {lm.n_params() / 1e6:.0f}M params, "
               f"fingerprint {lm.fingerprint}")
    cases = editlens.load_cases(sample_data_path(), limit=8)
    click.echo(f"\nWhat the model says about {len(cases)} CounterFact-style facts (target_true = fact, target_new = "
               "counterfactual):")
    show_answers(lm, cases)
