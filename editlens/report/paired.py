"""Paired comparisons of systems evaluated on the same cases: bootstrap intervals, sign-flip tests, Holm.

Two systems (methods, sweep points...) of one run are evaluated on the **same cases** of a dataset (the runner
gives units of one dataset, seed and size the same cases). A claim such as "method A keeps unrelated knowledge
better than method B" is a statement about the per-case differences ``d = other − ref``; comparing two pooled
means with their separate ±SEM ignores that pairing and is both less powerful and less honest. This module
works on the differences:

* **Pairing.** Rows are matched by ``(seed, case_id)`` within one dataset and one number of edits, separately
  for every ``probe_kind/metric`` column. A case present on one side only is refused with a
  :class:`~editlens.errors.StoreError` naming the systems, the column and example case ids (``unpaired="drop"``
  drops them and reports how many); a duplicated key is refused (pairing would be ambiguous); a pair whose value
  is NaN on either side (a metric that could not be computed) is dropped and counted in ``n_nan``.
* **Seeds.** Cases are nested in seeds. ``seeds="auto"`` (default): one seed — the cases are the sample;
  several seeds that all hold the *same* cases (a seed then only reorders edits or reseeds the method) —
  each case's differences are first averaged over the seeds (``case-mean``), so a case counts once and seed
  noise is within-case noise; several seeds with different cases (a seed chose which cases are edited) —
  **hierarchical** bootstrap: resample seeds with replacement, then cases within each drawn seed; the estimate
  is the mean over seeds of each seed's mean difference (every seed weighs the same). ``seeds="cases"`` with
  several seeds pools every (seed, case) pair as one independent unit (``pooled``; understates the uncertainty
  when seeds matter). ``n_seeds``,
  ``n_cases`` (cases per seed, ``min–max`` when they differ) and ``n_pairs`` say n at each level.
* **Confidence interval.** A two-sided bootstrap interval (``level`` 0.95) from ``resamples`` (default 2,000)
  resamples of cases, seeded (``seed`` and the comparison's key, so adding a method to a store does not change
  the intervals of the others). Single-level samples (one seed, or case means) get the **BCa** interval
  (bias-corrected and accelerated, Efron 1987; acceleration from the closed-form jackknife of the mean, bias
  correction counting ties as half): per-case differences of editing metrics are bounded and often skewed
  (a 0/1 accuracy, a KL ≥ 0 with a long tail), and BCa corrects the percentile interval's first-order error in
  skewed samples (second-order accurate) at the cost of a jackknife that is O(n) for a mean. The hierarchical
  case gets the **percentile** interval: a jackknife over a handful of seeds would give an unstable
  acceleration. When all differences are equal the interval is that value (a bootstrap cannot vary it).
* **Test.** ``test="signflip"`` (default): the paired sign-flip permutation test of the mean difference
  (null: the two systems are exchangeable on every case, so each difference is symmetric about 0); exact — all
  2ⁿ sign vectors enumerated — when 2ⁿ ≤ ``permutations`` (default 10,000, i.e. n ≤ 13), otherwise
  ``permutations`` random sign vectors with p = (1 + #{|T*| ≥ |T|}) / (1 + B) (Phipson & Smyth 2010, never 0).
  The statistic is the same weighted mean as the estimate (hierarchical: flips are per (seed, case) pair).
  ``test="wilcoxon"``: ``scipy.stats.wilcoxon`` (signed-rank, zeros dropped, exact for small n) on the case
  means, or on all pairs pooled in the hierarchical case (which ignores the nesting: prefer the sign-flip
  test there).
* **Multiple comparisons.** Holm's step-down correction across every test of the table (:func:`holm`;
  neither scipy nor numpy ships it and statsmodels is not a dependency: the function is small and checked
  against hand values in the tests). The interval is not corrected: ``ci_excludes_0`` marks intervals that
  exclude 0, ``holm_significant`` tests whose Holm-adjusted p is below ``alpha``; ``mark`` is ``*`` for the
  first and ``**`` for both.

:func:`compare` builds the table from a Store / store path / results DataFrame; ``editlens compare`` prints
it; the HTML report shows it; :func:`bootstrap_band` gives the plots' confidence bands (the same resampling).
"""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import special as _sp
from scipy import stats as _st

from editlens.errors import StoreError

#: columns of the table :func:`compare` returns, in order
COMPARE_COLUMNS = ("dataset", "n_edits", "ref", "system", "column", "n_seeds", "n_cases", "n_pairs", "n_nan",
                   "n_unpaired", "seed_mode", "mean_ref", "mean_system", "diff", "ci_low", "ci_high", "ci_method",
                   "p_value", "test", "p_holm", "ci_excludes_0", "holm_significant", "mark")
SEED_MODES = ("auto", "cases", "case-mean", "hierarchical")
TESTS = ("signflip", "wilcoxon")


# ============================================================================ building blocks
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted in m).

    With the m finite p-values sorted ascending, p_(1) ≤ ... ≤ p_(m): adj_(i) = max_{j ≤ i} min(1, (m − j + 1)
    p_(j)). Rejecting adj < α controls the family-wise error rate at α (Holm 1979).
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"holm: expected a 1-d sequence of p-values, got shape {p.shape}")
    bad = p[np.isfinite(p) & ((p < 0) | (p > 1))]
    if len(bad):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {bad[0]!r}")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def sign_flip_test(d: Sequence[float], *, weights: Sequence[float] | None = None, permutations: int = 10_000,
                   rng: np.random.Generator | int | None = 0) -> tuple[float, bool]:
    """Two-sided paired sign-flip permutation test of ``T = Σ w_i d_i`` (default w = 1/n: the mean).

    Returns ``(p, exact)``. Exact (every one of the 2ⁿ sign vectors, p = #{|T*| ≥ |T|} / 2ⁿ) when
    2ⁿ ≤ ``permutations``; otherwise ``permutations`` random sign vectors and p = (1 + #{|T*| ≥ |T|}) / (1 + B).
    Comparisons allow a relative 1e-9 slack so that sign vectors giving the same |T| up to rounding count.
    All-zero differences give p = 1.
    """
    d = np.asarray(d, dtype=float)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError("sign_flip_test: need a non-empty 1-d array of finite differences")
    n = len(d)
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != d.shape:
        raise ValueError(f"sign_flip_test: {len(w)} weights for {n} differences")
    wd = w * d
    t_obs = abs(wd.sum())
    tol = 1e-9 * max(np.abs(wd).sum(), 1e-300)
    if not np.any(wd != 0):
        return 1.0, n < 63 and 2 ** n <= permutations
    if n < 63 and 2 ** n <= permutations:
        count = 0
        for chunk in _sign_chunks(n):
            count += int((np.abs(chunk @ wd) >= t_obs - tol).sum())
        return count / 2 ** n, True
    gen = np.random.default_rng(rng)
    count, left = 0, permutations
    while left:
        b = min(left, max(1, 4_000_000 // n))
        signs = gen.integers(0, 2, size=(b, n), dtype=np.int8) * 2 - 1
        count += int((np.abs(signs @ wd) >= t_obs - tol).sum())
        left -= b
    return (1 + count) / (1 + permutations), False


def _sign_chunks(n: int, chunk_bits: int = 16):
    """All 2ⁿ sign vectors (±1), in blocks of at most 2^chunk_bits rows."""
    low = min(n, chunk_bits)
    base = ((np.arange(2 ** low)[:, None] >> np.arange(low)[None, :]) & 1).astype(float) * 2 - 1
    for hi in itertools.product((-1.0, 1.0), repeat=n - low):
        yield np.hstack([base, np.broadcast_to(np.array(hi, dtype=float), (len(base), n - low))]) if hi else base


def bootstrap_means(groups: Sequence[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the seed-balanced mean of ``groups`` (one 1-d array of values per seed).

    One group: ordinary case bootstrap (each replicate = mean of n cases drawn with replacement). Several: the
    two-stage (hierarchical) bootstrap — draw S seeds with replacement, then within each drawn seed n_s cases
    with replacement; replicate = mean over the S drawn seeds of their case means. Drawing seed s A_s times and
    resampling its cases independently each time gives case counts ~ Multinomial(A_s·n_s, 1/n_s) (a sum of
    independent multinomials with the same probabilities), which is how it is computed. Leading axes of the
    groups (e.g. many simulated samples) are kept: values of shape (..., n_s) give replicates (..., resamples).
    """
    groups = [np.asarray(g, dtype=float) for g in groups]
    S = len(groups)
    seed_counts = (np.ones((resamples, 1), dtype=np.int64) if S == 1
                   else rng.multinomial(S, np.full(S, 1.0 / S), size=resamples))
    total = 0.0
    for s, g in enumerate(groups):
        n = g.shape[-1]
        counts = np.empty((resamples, n), dtype=np.float64)
        for a in np.unique(seed_counts[:, s]):
            rows = np.flatnonzero(seed_counts[:, s] == a)
            counts[rows] = rng.multinomial(int(a) * n, np.full(n, 1.0 / n), size=len(rows)) if a else 0.0
        total = total + (g @ counts.T) / n  # (..., resamples): sum over slots of slot means
    return total / S


def bca_interval(values: np.ndarray, replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """BCa interval of the mean of ``values`` (..., n) from its bootstrap ``replicates`` (..., R).

    z0 = Φ⁻¹(share of replicates below the estimate, ties counted as half); acceleration
    a = Σ(θ̄ − θ₍ᵢ₎)³ / (6 (Σ(θ̄ − θ₍ᵢ₎)²)^1.5) from the jackknife of the mean, θ₍ᵢ₎ = (n θ̂ − xᵢ)/(n − 1); the
    ends are the replicates' quantiles at Φ(z0 + (z0 + z)/(1 − a (z0 + z))) for z = Φ⁻¹(α/2), Φ⁻¹(1 − α/2).
    Constant samples give (θ̂, θ̂).
    """
    x = np.asarray(values, dtype=float)
    reps = np.asarray(replicates, dtype=float)
    n = x.shape[-1]
    theta = x.mean(-1)
    share = ((reps < theta[..., None]).sum(-1) + 0.5 * (reps == theta[..., None]).sum(-1)) / reps.shape[-1]
    z0 = _sp.ndtri(np.clip(share, 1e-12, 1 - 1e-12))
    jack = (n * theta[..., None] - x) / max(n - 1, 1)
    dev = jack.mean(-1)[..., None] - jack
    num, den = (dev ** 3).sum(-1), (dev ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(den > 0, num / (6.0 * np.power(den, 1.5, where=den > 0, out=np.ones_like(den))), 0.0)
    alpha = 1 - level
    ends = []
    for z in (_sp.ndtri(alpha / 2), _sp.ndtri(1 - alpha / 2)):
        q = _sp.ndtr(z0 + (z0 + z) / (1 - acc * (z0 + z)))
        ends.append(_quantile_rows(reps, q))
    lo, hi = ends
    const = np.ptp(x, axis=-1) == 0
    lo, hi = np.where(const, theta, lo), np.where(const, theta, hi)
    return lo, hi


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval: the α/2 and 1 − α/2 quantiles of the replicates (last axis)."""
    alpha = 1 - level
    reps = np.asarray(replicates, dtype=float)
    return np.quantile(reps, alpha / 2, axis=-1), np.quantile(reps, 1 - alpha / 2, axis=-1)


def _quantile_rows(reps: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row quantile (linear interpolation) of ``reps`` (..., R) at per-row levels ``q`` (...)."""
    srt = np.sort(reps, axis=-1)
    R = srt.shape[-1]
    pos = np.clip(np.nan_to_num(q, nan=0.5), 0, 1) * (R - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, R - 1)
    frac = pos - lo
    a = np.take_along_axis(srt, lo[..., None], -1)[..., 0]
    b = np.take_along_axis(srt, hi[..., None], -1)[..., 0]
    return a + frac * (b - a)


def bootstrap_ci(values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, method: str = "bca",
                 rng: np.random.Generator | int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap interval of the mean of ``values`` over its last axis (cases); leading axes are vectorised.

    ``method``: ``"bca"`` (default) or ``"percentile"``. Returns ``(low, high)`` (scalars for a 1-d input).
    """
    if method not in ("bca", "percentile"):
        raise ValueError(f"bootstrap_ci: method must be 'bca' or 'percentile', not {method!r}")
    x = np.asarray(values, dtype=float)
    if x.shape[-1] < 1 or not np.isfinite(x).all():
        raise ValueError("bootstrap_ci: need at least one finite value per sample")
    reps = bootstrap_means([x], resamples, np.random.default_rng(rng))
    lo, hi = bca_interval(x, reps, level) if method == "bca" else percentile_interval(reps, level)
    return (float(lo), float(hi)) if x.ndim == 1 else (lo, hi)


# ============================================================================ one paired comparison
@dataclass
class Paired:
    """The statistics of one paired comparison (see the module docstring)."""

    n_seeds: int
    n_cases: str
    n_pairs: int
    seed_mode: str
    mean_ref: float
    mean_system: float
    diff: float
    ci_low: float
    ci_high: float
    ci_method: str
    p_value: float
    test: str


def paired_stats(ref: Sequence[np.ndarray], other: Sequence[np.ndarray], *, same_cases: bool = False,
                 seeds: str = "auto", resamples: int = 2000, level: float = 0.95, test: str = "signflip",
                 permutations: int = 10_000, rng: np.random.Generator | int | None = 0) -> Paired:
    """Statistics of ``other − ref`` given per-seed aligned value arrays (``ref[s][i]`` pairs ``other[s][i]``).

    ``same_cases`` says that every seed holds the same cases in the same order (needed for ``case-mean``).
    """
    if seeds not in SEED_MODES:
        raise ValueError(f"seeds must be one of {SEED_MODES}, not {seeds!r}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, not {test!r}")
    r = [np.asarray(a, dtype=float) for a in ref]
    o = [np.asarray(a, dtype=float) for a in other]
    if not r or any(len(a) == 0 for a in r) or [len(a) for a in r] != [len(a) for a in o]:
        raise ValueError("paired_stats: every seed needs the same, non-zero number of values on both sides")
    S = len(r)
    mode = seeds
    if mode == "auto":
        mode = "cases" if S == 1 else ("case-mean" if same_cases else "hierarchical")
    if mode == "case-mean" and not same_cases:
        raise ValueError("seed mode 'case-mean' needs the same cases in every seed")
    if mode == "cases" and S > 1:
        mode = "pooled"  # explicit 'cases' with several seeds: every (seed, case) pair is one sample unit
    gen = np.random.default_rng(rng)
    sizes = [len(a) for a in r]
    n_cases = str(sizes[0]) if len(set(sizes)) == 1 else f"{min(sizes)}–{max(sizes)}"
    if mode in ("case-mean", "pooled") or S == 1:
        if mode == "case-mean":
            rr, oo = np.mean(r, axis=0), np.mean(o, axis=0)
        else:
            rr, oo = np.concatenate(r), np.concatenate(o)
        d = oo - rr
        reps = bootstrap_means([d], resamples, gen)
        lo, hi = bca_interval(d, reps, level)
        ci_method, weights, units = "BCa", None, d
        mean_r, mean_o, diff = float(rr.mean()), float(oo.mean()), float(d.mean())
        lo, hi = float(lo), float(hi)
    else:
        ds = [b - a for a, b in zip(r, o)]
        reps = bootstrap_means(ds, resamples, gen)
        diff = float(np.mean([x.mean() for x in ds]))
        if all(np.ptp(x) == 0 for x in ds) and len({float(x[0]) for x in ds}) == 1:
            lo = hi = diff
        else:
            lo, hi = (float(v) for v in percentile_interval(reps, level))
        ci_method = "percentile (seeds, then cases)"
        units = np.concatenate(ds)
        weights = np.concatenate([np.full(len(x), 1.0 / (S * len(x))) for x in ds])
        mean_r = float(np.mean([a.mean() for a in r]))
        mean_o = float(np.mean([b.mean() for b in o]))
    if test == "signflip":
        p, exact = sign_flip_test(units, weights=weights, permutations=permutations, rng=gen)
        tname = "sign-flip (exact)" if exact else f"sign-flip ({permutations} permutations)"
    else:
        nz = units[units != 0]
        if len(nz) == 0:
            p = 1.0
        else:
            p = float(_st.wilcoxon(units, zero_method="wilcox").pvalue)
        tname = "wilcoxon" + (" (pooled pairs)" if weights is not None else "")
    return Paired(S, n_cases, int(sum(sizes)), mode, mean_r, mean_o, diff, lo, hi, ci_method, float(p), tname)


def _key_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])


# ============================================================================ from a store
def system_ids(df: pd.DataFrame) -> pd.Series:
    """One id per row naming its configuration: the label, then ``| param=value`` for each swept value."""
    ident = df["method_label"].astype(str)
    for c in [c for c in df.columns if c.startswith("sweep.") and df[c].notna().any()]:
        val = df[c]
        part = pd.Series([f" | {c.split('.')[-1]}={_fmt(v)}" if _present(v) else "" for v in val], index=df.index)
        ident = ident + part
    return ident


def _present(v: Any) -> bool:
    return not (v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def paired_frame(source: Any, *, run_id: str | None = None, all_steps: bool = False) -> pd.DataFrame:
    """The rows of one run (the latest by default) with ``system``, ``setting_n`` (number of edits: the unit's
    planned size in a batch regime, the checkpoint in a sequential one), ``seed`` and ``dataset`` columns.

    Without ``all_steps`` only each unit's last evaluation step is kept (as the report's tables do).
    """
    from editlens.report import tables
    from editlens.runs.store import Store

    if isinstance(source, pd.DataFrame):
        df = tables.results_frame(source)
        if run_id is not None and "run_id" in df.columns:
            df = df[df["run_id"] == run_id]
    else:
        own = not isinstance(source, Store)
        st = Store(source, readonly=True) if own else source
        try:
            ids = st.run_ids()
            if run_id is not None and run_id not in ids:
                raise StoreError(f"store {st.path}: no run {run_id!r}; runs: {', '.join(ids) or 'none'}")
            sel = run_id if run_id is not None else (ids[-1] if ids else None)
            df = tables.results_frame(st, sel)
        finally:
            if own:
                st.close()
    if "run_id" in df.columns and df["run_id"].nunique() > 1:
        raise StoreError(f"the results hold {df['run_id'].nunique()} runs ({', '.join(map(str, df['run_id'].unique()))}); "
                         "compare one run at a time (run_id=)")
    if not all_steps:
        df = tables.final_rows(df)
    df = df.copy()
    df["system"] = system_ids(df)
    df["dataset"] = df["dataset"].astype(object).where(df["dataset"].notna(), "–") if "dataset" in df.columns \
        else "–"
    seq = df["regime"].astype(str).eq("sequential") if "regime" in df.columns else pd.Series(False, index=df.index)
    planned = pd.to_numeric(df["meta.n_edits"], errors="coerce") if "meta.n_edits" in df.columns else None
    row_n = pd.to_numeric(df["n_edits"], errors="coerce") if "n_edits" in df.columns else pd.Series(np.nan, index=df.index)
    n = row_n if planned is None else planned.where(~seq & planned.notna(), row_n)
    df["setting_n"] = n
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(0).astype(int) if "seed" in df.columns else 0
    return df


def resolve_ref(systems: Sequence[str], ref: str) -> str:
    """The system id ``ref`` names: an exact id, or a label with exactly one configuration."""
    systems = list(dict.fromkeys(systems))
    if ref in systems:
        return ref
    hits = [s for s in systems if s.split(" | ")[0] == ref]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise StoreError(f"--ref {ref!r} names {len(hits)} configurations ({'; '.join(hits)}): give one of them "
                         "exactly")
    raise StoreError(f"--ref {ref!r} is not a method of this run; systems: {', '.join(systems) or 'none'}")


def compare(source: Any, ref: str, *, metrics: Sequence[str] | None = None,
            probe_kinds: Sequence[str] | None = None, run_id: str | None = None, resamples: int = 2000,
            level: float = 0.95, seed: int = 0, test: str = "signflip", permutations: int = 10_000,
            seeds: str = "auto", unpaired: str = "error", alpha: float = 0.05, all_steps: bool = False,
            systems: Sequence[str] | None = None) -> pd.DataFrame:
    """Paired comparison of every other system with ``ref`` (see the module docstring).

    ``source`` is a Store, a store path or a results DataFrame (one run). ``metrics`` keeps metric names or
    ``kind/metric`` columns, ``probe_kinds`` probe kinds; ``systems`` limits the compared systems. Returns a
    DataFrame with :data:`COMPARE_COLUMNS`; ``df.attrs["notes"]`` lists what was skipped and why and
    ``df.attrs["settings"]`` the resampling settings.
    """
    if unpaired not in ("error", "drop"):
        raise ValueError(f"unpaired must be 'error' or 'drop', not {unpaired!r}")
    if seeds not in SEED_MODES:
        raise ValueError(f"seeds must be one of {', '.join(SEED_MODES)}, not {seeds!r}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, not {test!r}")
    if not isinstance(resamples, (int, np.integer)) or resamples < 100:
        raise ValueError(f"resamples must be an integer ≥ 100 (default 2000), got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    df = paired_frame(source, run_id=run_id, all_steps=all_steps)
    if df.empty:
        raise StoreError("no result rows to compare")
    if "case_id" not in df.columns:
        raise StoreError("the results have no case_id column: paired comparisons match cases by case_id")
    ref_id = resolve_ref(df["system"].unique(), ref)
    notes: list[str] = []
    if metrics:
        want = set(metrics)
        known = set(df["metric"].astype(str)) | set(df["column"].astype(str))
        missing = sorted(want - known)
        if missing:
            raise StoreError(f"metrics not in this run: {', '.join(missing)}; it has "
                             f"{', '.join(sorted(df['column'].astype(str).unique()))}")
        df = df[df["metric"].astype(str).isin(want) | df["column"].astype(str).isin(want)]
    if probe_kinds:
        kinds = set(df["probe_kind"].dropna().astype(str)) if "probe_kind" in df.columns else set()
        missing = sorted(set(probe_kinds) - kinds)
        if missing:
            raise StoreError(f"probe kinds not in this run: {', '.join(missing)}; it has {', '.join(sorted(kinds))}")
        df = df[df["probe_kind"].astype(str).isin(set(probe_kinds))]
    if systems:
        unknown = sorted(set(systems) - set(df["system"]))
        if unknown:
            raise StoreError(f"systems not in this run: {', '.join(unknown)}")
    no_case = df["case_id"].isna()
    if no_case.any():
        cols = sorted(df.loc[no_case, "column"].astype(str).unique())
        notes.append(f"{int(no_case.sum())} rows without a case_id ({', '.join(cols)}) cannot be paired and were left out")
        df = df[~no_case]
    df["case_id"] = df["case_id"].astype(str)
    records: list[dict] = []
    # one pass over the rows: (dataset, n, system, column) -> {(seed, case_id): [values]} (plain dicts: pandas
    # merges per comparison cost ~50 ms each, which a table of hundreds of comparisons cannot afford)
    cells: dict[tuple, dict[tuple, list[float]]] = {}
    for ds_, n_, sy_, co_, se_, ca_, va_ in zip(df["dataset"], df["setting_n"], df["system"], df["column"],
                                               df["seed"], df["case_id"], df["value"]):
        n_ = None if pd.isna(n_) else int(n_)
        cells.setdefault((ds_, n_, sy_, co_), {}).setdefault((int(se_), ca_), []).append(float(va_))
    settings = list(dict.fromkeys((k[0], k[1]) for k in cells))
    missing_cols: dict[tuple[str, str], list[str]] = {}
    for dataset, n_edits in settings:
        where = f"dataset {dataset}" + ("" if n_edits is None else f", {n_edits} edits")
        here = [k for k in cells if k[0] == dataset and k[1] == n_edits]
        others = [s for s in dict.fromkeys(k[2] for k in here) if s != ref_id and (not systems or s in systems)]
        ref_cols = [k[3] for k in here if k[2] == ref_id]
        if not ref_cols:
            if others:
                notes.append(f"{where}: the reference {ref_id} has no results; not compared: {', '.join(others)}")
            continue
        for col in ref_cols:
            rc = cells[(dataset, n_edits, ref_id, col)]
            _check_dups(rc, ref_id, col, where)
            for sysid in others:
                oc = cells.get((dataset, n_edits, sysid, col))
                if oc is None:
                    missing_cols.setdefault((where, sysid), []).append(col)
                    continue
                _check_dups(oc, sysid, col, where)
                only_r = sorted(k for k in rc if k not in oc)
                only_o = sorted(k for k in oc if k not in rc)
                n_unpaired = len(only_r) + len(only_o)
                if n_unpaired and unpaired == "error":
                    raise StoreError(_unpaired_message(ref_id, sysid, col, where, only_r, only_o))
                both = sorted(k for k in rc if k in oc)
                good = [k for k in both if not (math.isnan(rc[k][0]) or math.isnan(oc[k][0]))]
                rec = {"dataset": dataset, "n_edits": n_edits, "ref": ref_id, "system": sysid, "column": col,
                       "n_nan": len(both) - len(good), "n_unpaired": n_unpaired}
                if not good:
                    notes.append(f"{where}: {sysid} vs {ref_id} on {col}: no pair with values on both sides")
                    continue
                by_seed: dict[int, list[tuple]] = {}
                for k in good:
                    by_seed.setdefault(k[0], []).append(k)
                seed_keys = [by_seed[s] for s in sorted(by_seed)]
                case_sets = {tuple(k[1] for k in ks) for ks in seed_keys}
                res = paired_stats([np.array([rc[k][0] for k in ks]) for ks in seed_keys],
                                   [np.array([oc[k][0] for k in ks]) for ks in seed_keys],
                                   same_cases=len(case_sets) == 1, seeds=seeds, resamples=int(resamples),
                                   level=level, test=test, permutations=permutations,
                                   rng=_key_rng(seed, f"{dataset}|{n_edits}|{ref_id}|{sysid}|{col}"))
                rec.update(res.__dict__)
                records.append(rec)
    for (where, sysid), cols in missing_cols.items():
        notes.append(f"{where}: {sysid} has no {', '.join(cols)} (not compared)")
    out = pd.DataFrame(records)
    if out.empty:
        out = pd.DataFrame(columns=list(COMPARE_COLUMNS))
    else:
        out["p_holm"] = holm(out["p_value"].to_numpy())
        out["ci_excludes_0"] = (out["ci_low"] > 0) | (out["ci_high"] < 0)
        out["holm_significant"] = out["p_holm"] < alpha
        out["mark"] = np.where(out["ci_excludes_0"] & out["holm_significant"], "**",
                               np.where(out["ci_excludes_0"], "*", ""))
        out = out[list(COMPARE_COLUMNS)]
        if out["n_unpaired"].sum():
            notes.append(f"{int(out['n_unpaired'].sum())} unpaired rows (a case on one side only) were dropped")
        small = out["seed_mode"].ne("hierarchical") & (pd.to_numeric(out["n_cases"], errors="coerce") < 20)
        if small.any():
            notes.append(f"{int(small.sum())} comparison(s) rest on fewer than 20 pairs: bootstrap intervals are too "
                         "narrow at such n (95% intervals cover ~90% at n = 10, ~92% at n = 20 in simulations), "
                         "so read the exact sign-flip p-value there")
        if out["n_nan"].sum():
            notes.append(f"{int(out['n_nan'].sum())} pairs with a NaN value on one side were dropped")
    out.attrs["notes"] = notes
    out.attrs["settings"] = {"ref": ref_id, "resamples": int(resamples), "level": level, "seed": seed,
                             "test": test, "permutations": permutations, "seeds": seeds, "alpha": alpha,
                             "m_tests": int(out["p_value"].notna().sum()) if len(out) else 0}
    return out


def _examples(keys: Sequence[tuple], k: int = 5) -> str:
    ex = [f"{c} (seed {s})" for s, c in keys][:k]
    return ", ".join(ex) + (f", ... ({len(keys)} in all)" if len(keys) > k else "")


def _check_dups(cell: dict[tuple, list[float]], sysid: str, col: str, where: str) -> None:
    dup = sorted(k for k, v in cell.items() if len(v) > 1)
    if dup:
        raise StoreError(f"{where}, {col}: {sysid} has several rows for the same (seed, case_id) ({_examples(dup)}), "
                         "so pairing is ambiguous (two units with one configuration? give them distinct labels)")


def _unpaired_message(ref_id: str, sysid: str, col: str, where: str, only_r: Sequence[tuple],
                      only_o: Sequence[tuple]) -> str:
    parts = [f"{where}, {col}: {sysid} and the reference {ref_id} were not evaluated on the same cases, so the "
             "comparison cannot be paired:"]
    if len(only_r):
        parts.append(f"{len(only_r)} case(s) only in {ref_id}: {_examples(only_r)};")
    if len(only_o):
        parts.append(f"{len(only_o)} case(s) only in {sysid}: {_examples(only_o)};")
    parts.append("rerun the missing units, or drop the unpaired cases (--drop-unpaired; unpaired='drop')")
    return " ".join(parts)


# ============================================================================ rendering helpers
def format_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A display version: ``diff [low, high]``, p-values, marks and n, one row per comparison."""
    if table.empty:
        return pd.DataFrame(columns=["dataset", "n_edits", "system", "column", "n", "mean ref", "mean system",
                                     "diff [95% CI]", "p", "p (Holm)", "mark"])
    lvl = table.attrs.get("settings", {}).get("level", 0.95)
    rows = []
    for r in table.itertuples(index=False):
        n = f"{r.n_seeds}×{r.n_cases}" if r.n_seeds > 1 else f"{r.n_pairs}"
        rows.append({"dataset": r.dataset, "n_edits": "–" if pd.isna(r.n_edits) else int(r.n_edits),
                     "system": r.system, "column": r.column, "n": n,
                     "mean ref": f"{r.mean_ref:.{digits}f}", "mean system": f"{r.mean_system:.{digits}f}",
                     f"diff [{lvl:.0%} CI]": f"{_num(r.diff, digits)} [{_num(r.ci_low, digits)}, {_num(r.ci_high, digits)}]",
                     "p": _pfmt(r.p_value), "p (Holm)": _pfmt(r.p_holm), "mark": r.mark})
    return pd.DataFrame(rows)


def _num(v: float, digits: int) -> str:
    """Signed, ``digits`` decimals; values too small to show that way (but not 0) in scientific notation."""
    if v != 0 and abs(v) < 0.5 * 10 ** -digits:
        return f"{v:+.1e}"
    return f"{v:+.{digits}f}"


def _pfmt(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def describe(table: pd.DataFrame) -> str:
    """One paragraph saying how the table was computed (reference, resampling, test, correction, n)."""
    s = table.attrs.get("settings", {})
    modes = sorted(set(table["seed_mode"])) if len(table) else []
    cis = sorted(set(table["ci_method"])) if len(table) else []
    tests_ = sorted(set(table["test"])) if len(table) else []
    return (f"Paired differences (system − {s.get('ref', '?')}) over the same cases, matched by seed and case_id "
            f"per probe kind/metric. {s.get('level', 0.95):.0%} bootstrap interval ({', '.join(cis) or '–'}; "
            f"{s.get('resamples', '?')} resamples of cases, seed {s.get('seed', '?')}); test: {', '.join(tests_) or '–'}; "
            f"Holm correction over the {s.get('m_tests', 0)} tests of the table. Seeds: {', '.join(modes) or '–'} "
            "(n = cases, or seeds×cases per seed). Mark: * the interval excludes 0, ** and the Holm-adjusted "
            f"p < {s.get('alpha', 0.05)}.")


# ============================================================================ plot bands
def bootstrap_band(df: pd.DataFrame, x: str, hue: str | None, *, y: str = "value", resamples: int = 1000,
                   level: float = 0.95, seed: int = 0) -> pd.DataFrame | None:
    """Per (hue, x) point: the mean and a bootstrap interval of it, resampling cases with the *same* resampled
    case set for every point of the frame (a paired bootstrap: curves that share cases move together).

    Needs ``case_id`` (a case is ``(dataset, case_id)`` when there is a dataset column) and uses ``seed`` when
    several seeds are present: seeds are resampled first, then cases, as in :func:`bootstrap_means`; a point is
    the mean over its seeds of its case means, resampled as a ratio over the cases it has. Returns
    ``hue, x, mean, low, high`` (percentile interval), or None when the frame has no case ids.
    """
    if "case_id" not in df.columns or df["case_id"].isna().all():
        return None
    d = df[[c for c in dict.fromkeys([x, y, "case_id", "seed", "dataset", hue]) if c and c in df.columns]].copy()
    d = d[d["case_id"].notna() & d[y].notna()]
    if d.empty:
        return None
    # a case is (dataset, case_id): ids of two datasets may coincide
    d["case_id"] = (d["dataset"].astype(str) + "\x1f" if "dataset" in d.columns else "") + d["case_id"].astype(str)
    d["_seed"] = pd.to_numeric(d["seed"], errors="coerce").fillna(0).astype(int) if "seed" in d.columns else 0
    d["_pt"] = list(zip(d[hue].astype(str) if hue else [""] * len(d), d[x]))
    rng = np.random.default_rng(seed)
    seeds = sorted(d["_seed"].unique())
    S = len(seeds)
    seed_counts = (np.ones((resamples, 1), dtype=np.int64) if S == 1
                   else rng.multinomial(S, np.full(S, 1.0 / S), size=resamples))
    pts = list(dict.fromkeys(d["_pt"]))
    num = np.zeros((len(pts), resamples))
    den = np.zeros((len(pts), resamples))
    pidx = {p: i for i, p in enumerate(pts)}
    for si, s in enumerate(seeds):
        ds = d[d["_seed"] == s]
        wide = ds.pivot_table(index="_pt", columns="case_id", values=y, aggfunc="mean")
        n = wide.shape[1]
        counts = np.zeros((resamples, n))
        for a in np.unique(seed_counts[:, si]):
            rows = np.flatnonzero(seed_counts[:, si] == a)
            if a:
                counts[rows] = rng.multinomial(int(a) * n, np.full(n, 1.0 / n), size=len(rows))
        vals = wide.to_numpy(dtype=float)
        have = ~np.isnan(vals)
        w_sum = have.astype(float) @ counts.T  # (points, R): resampled case weight each point has
        m = np.nan_to_num(vals) @ counts.T
        with np.errstate(invalid="ignore", divide="ignore"):
            seed_mean = m / w_sum
        # seed-balanced: each drawn seed slot weighs the same; a point lacking this seed skips it
        slot = seed_counts[:, si][None, :].astype(float) * (have.any(1)[:, None])
        ok = np.isfinite(seed_mean)
        rows_idx = [pidx[p] for p in wide.index]
        num[rows_idx] += np.where(ok, seed_mean * slot, 0.0)
        den[rows_idx] += np.where(ok, slot, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = num / den
    alpha = 1 - level
    lo = np.nanquantile(reps, alpha / 2, axis=1)
    hi = np.nanquantile(reps, 1 - alpha / 2, axis=1)
    point_means = d.groupby(["_pt", "_seed"], sort=False)[y].mean().groupby(level=0, sort=False).mean()
    return pd.DataFrame({"hue": [p[0] for p in pts], "x": [p[1] for p in pts],
                         "mean": [float(point_means[p]) for p in pts], "low": lo, "high": hi})
