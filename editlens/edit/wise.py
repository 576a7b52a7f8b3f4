"""WISE — side memory with routing, sharding and merging (Wang et al., NeurIPS 2024, "WISE: Rethinking the
Knowledge Memory for Lifelong Model Editing of Large Language Models").

* **Main and side memory.** The *main memory* is the MLP output projection ``W`` of layer ``layer``. A *side
  memory* is a copy ``W' = W + Δ`` of it; edits train only ``Δ``. The model itself is never modified: during
  a System call a forward hook adds ``A(x) Δᵀ`` to the projection's output for the rows routed to the side
  memory, where ``A(x)`` is the projection's input (the MLP's intermediate activation) — i.e. the row is
  computed with ``W'`` instead of ``W`` (bias included, exactly).
* **Routing activation.** ``Δ_act(x) = mean over the prompt's tokens t of ||A(x_t) Δᵀ||₂`` (the norm of what the
  side memory would change). A query is answered by the side memory with the largest ``Δ_act`` among those
  whose ``Δ_act`` exceeds their threshold ``ε``; otherwise by the main memory (the output is returned
  untouched, so unrouted queries are bit-identical to the base model). The decision uses the prompt tokens
  only and holds for the target tokens (teacher forcing) and every generated token.
* **Training** of ``Δ`` (Adam, ``lr``, at most ``n_iter`` steps, early stop) minimises the target NLL with the
  side memory in place plus the paper's routing margin loss
  ``max(0, Δ_act(x_i) − α) + max(0, β − Δ_act(x_e)) + max(0, γ − (Δ_act(x_e) − Δ_act(x_i)))``
  averaged over edit prompts ``x_e`` (the batch's and, for the routing term, the memory's earlier ones) and
  irrelevant prompts ``x_i``: generic factual cloze prompts and held-out prose (:func:`irrelevant_prompts`, less
  any that is the same text as an edit prompt — one input cannot be both above and below the threshold) and
  **contrast prompts** (:func:`contrast_prompts`): each edit's own template filled with ``n_contrast`` other
  subjects, the shape of CounterFact's neighbourhood prompts. Without them the router learns the *relation*
  (the template tokens, shared by every neighbourhood prompt) instead of the fact. The subjects are the ones of
  a typed shipped pool (:data:`_CONTRAST_POOL`: countries, cities, people, written works, artworks, organisations,
  substances, places) *most like the edited subject* as the model sees them (:func:`nearest_contrasts`: each
  candidate's template prompt ranked by the centred cosine of its mean activation at the router's input): other
  novels for a novel, other elements for an element. Against contrasts of other kinds the router learns the
  edited subject's *kind* with the relation, and admits every neighbour of that kind ("Pride and Prejudice was
  written by" next to a "Romeo and Juliet" edit).
* **Threshold.** After each edit batch, ``ε`` of the memory is calibrated (:func:`calibrate_threshold`): the
  midpoint between the smallest edit score and the largest negative score below it. When every negative is
  below (``diagnostics["router_separated"]``) that is the midpoint between the two groups; when not, ``ε`` still
  sits just below the smallest edit score so every edit stays routed. The negatives include ``n_calibration``
  further contrast prompts per edit that the router was *not* trained on (dealt from the same nearest
  candidates), so ``ε`` sits above prompts it has not seen, not only above the ones it was pushed below.
* **Knowledge sharding and merging.** The edits of a batch are dealt round-robin to ``n_shards`` shards. Each
  shard trains its own copy of the memory's ``Δ`` under a fixed random gradient mask of density
  ``mask_ratio`` (a random subspace of the weight entries; seeded per shard). The shards' increments
  ``τ_s = Δ_s − Δ`` are then merged with TIES (:func:`ties_merge`: trim to the top ``ties_density`` magnitudes,
  elect the sign of the summed trimmed increments, average the increments that agree with it) and added to ``Δ``.
* **Several side memories.** In sequential editing, after ``edits_per_memory`` edits (0 = never) a new side
  memory (``Δ = 0``) is started; routing picks among all of them. A later batch written into a memory replays up
  to ``n_replay`` of its earlier edits (prompt and target) in the NLL, so they are not overwritten.

Simplifications and deviations (documented): the increments are merged relative to the memory before the batch
(the paper merges shard copies relative to the main memory; the same thing for the first batch); ``Δ_act`` is
averaged over prompt tokens; the irrelevant prompts are a small fixed set plus template contrasts rather than a
sample of the pre-training corpus, and the contrasts are hard negatives (the pool's subjects nearest the edited
one; ``contrast_pool`` candidates are ranked, 0 = the whole pool, at the cost of one forward pass up to the
router's layer per candidate and rewrite); the reference implementation sets the threshold from the edit
activations alone (its ``act_ratio``), here it is calibrated between edit and held-out negative scores; in long sequential runs the replayed edits and the earlier
contrasts are seeded samples (at most ``n_replay`` edits, 64 training and 128 calibration contrasts).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from editlens.edit.base import Edit, Editor, HParams, SequenceState, register_method
from editlens.edit.base import FRACTION, NON_NEGATIVE, POSITIVE
from editlens.edit.grace import AdaptorSystem, LayerAdaptor, prompt_target_batch, target_nll
from editlens.data.schema import fill_template
from editlens.errors import HParamsError
from editlens.lm import ops
from editlens.lm.arch import weight_view
from editlens.lm.hooks import record_io

if TYPE_CHECKING:  # pragma: no cover
    from editlens.data.schema import EditCase
    from editlens.lm.load import LM


@dataclass
class WiseHParams(HParams):
    """Hyperparameters of WISE (see the module docstring)."""

    layer: int = -4
    n_shards: int = 2
    mask_ratio: float = 0.2
    ties_density: float = 1.0
    lr: float = 0.01
    n_iter: int = 40
    loss_stop: float = 0.05
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    n_irrelevant: int = 12
    n_contrast: int = 40
    n_calibration: int = 12
    n_replay: int = 16
    contrast_pool: int = 0
    edits_per_memory: int = 0
    seed: int = 0

    RANGES = {"mask_ratio": FRACTION, "ties_density": FRACTION, "lr": POSITIVE, "loss_stop": NON_NEGATIVE,
              "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE}
    ARCH_DEFAULTS = {"tiny": {"layer": 2, "alpha": 0.05, "beta": 0.5, "gamma": 0.3, "lr": 0.05, "n_iter": 30,
                              "n_irrelevant": 6, "n_contrast": 4, "n_calibration": 2},
                     "smollm2-135m": {"layer": 26, "lr": 0.02, "n_iter": 60}}

    def validate(self) -> None:
        if self.n_shards < 1:
            raise HParamsError(f"hyperparameter 'n_shards' of method 'wise' must be >= 1, got {self.n_shards}")
        for key in ("mask_ratio", "ties_density"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise HParamsError(f"hyperparameter {key!r} of method 'wise' must be in (0, 1], got {v}")
        for key in ("n_irrelevant", "n_contrast", "n_calibration", "n_replay", "contrast_pool"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise HParamsError(f"hyperparameter {key!r} of method 'wise' must be an integer >= 0, got {v!r}")
        if self.n_contrast > len(_CONTRAST_SUBJECTS) - self.n_calibration:
            raise HParamsError(f"hyperparameters 'n_contrast' + 'n_calibration' of method 'wise' are "
                               f"{self.n_contrast} + {self.n_calibration}, but there are only "
                               f"{len(_CONTRAST_SUBJECTS)} contrast subjects")

    def layer_index(self, lm: "LM") -> int:
        n = lm.n_layers
        i = self.layer + n if self.layer < 0 else self.layer
        if not 0 <= i < n:
            raise HParamsError(f"hyperparameter 'layer' of method 'wise' is {self.layer}, but the model has {n} layers")
        return i


# ============================================================================================ pure functions
def activation_scores(acts: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Δ_act`` per row: mean over the masked tokens of ``||A_t Δᵀ||₂``.

    Args:
        acts: ``[rows, seq, d_in]`` activations (inputs of the projection).
        delta: ``[d_out, d_in]`` side-memory difference ``W' − W``.
        mask: ``[rows, seq]`` bool, the prompt tokens (default: all).
    """
    norms = torch.linalg.vector_norm(acts.to(delta.dtype) @ delta.t(), dim=-1)  # [rows, seq]
    if mask is None:
        return norms.mean(dim=-1)
    m = mask.to(norms.dtype)
    return (norms * m).sum(-1) / m.sum(-1).clamp(min=1)


def routing_loss(edit_scores: torch.Tensor, irr_scores: torch.Tensor, alpha: float, beta: float, gamma: float
                 ) -> torch.Tensor:
    """WISE's margin loss, averaged over all (edit, irrelevant) pairs."""
    e = edit_scores[:, None]
    i = irr_scores[None, :]
    l = torch.relu(i - alpha) + torch.relu(beta - e) + torch.relu(gamma - (e - i))
    return l.mean()


def ties_merge(taus: Sequence[torch.Tensor], density: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of task vectors: trim, elect sign, disjoint mean.

    Each ``τ`` keeps its top ``density`` fraction of entries by magnitude; the elected sign of an entry is the
    sign of the sum of trimmed values; the result is the mean of the trimmed values that agree with it (0 where
    none does).
    """
    stack = torch.stack([t.float() for t in taus])
    if density < 1.0:
        flat = stack.reshape(len(taus), -1).abs()
        k = max(1, int(round(density * flat.shape[1])))
        thr = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values
        stack = torch.where(stack.abs() >= thr.view(-1, *[1] * (stack.dim() - 1)), stack, torch.zeros_like(stack))
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign[None]) & (stack != 0)
    num = (stack * agree).sum(0)
    cnt = agree.sum(0).clamp(min=1)
    return num / cnt


def calibrate_threshold(edit_scores: Sequence[float], irr_scores: Sequence[float]) -> tuple[float, bool]:
    """``(ε, separated)``: the midpoint between the smallest edit score and the largest negative score below it.

    ``separated`` says whether every negative score is below the smallest edit score (then ``ε`` is the midpoint
    between the two groups). When some negatives score as high as an edit, ``ε`` still sits in the gap just below
    the smallest edit score, so that every edit of the memory stays routed to it (the router compares
    ``Δ_act > ε`` strictly: a threshold *at* the smallest edit score would drop that edit); with no negative
    below it, ``ε`` is half the smallest edit score.
    """
    lo = min(edit_scores)
    below = [float(x) for x in irr_scores if x < lo]
    eps = (lo + max(below)) / 2 if below else lo / 2
    return eps, len(below) == len(irr_scores)


# ============================================================================================ adaptor
@dataclass
class SideMemory:
    delta: torch.Tensor  # [d_out, d_in] float32
    eps: float = float("inf")
    prompts: list[str] = field(default_factory=list)
    #: the new targets of its edits (parallel to ``prompts``), replayed when later edits train the memory
    targets: list[str] = field(default_factory=list)
    #: the subjects of its edits (never used as contrast subjects of this memory)
    subjects: set[str] = field(default_factory=set)
    #: its edit prompts as written (before the system's prompt format), to keep them out of the negatives
    texts: list[str] = field(default_factory=list)
    #: same-template contrast prompts of its edits: trained below the threshold / held out to calibrate it
    contrasts: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)


class WiseAdaptor(LayerAdaptor):
    """Side memories at one projection and the per-row router."""

    def __init__(self, module: str):
        self.module = module
        self.memories: list[SideMemory] = []
        #: per row of the last full forward: memory used (-1 = main memory) and the best score. Rows are in that
        #: padded batch's order — the system's calls group prompts sorted by length, not in the order given
        self.last_route = torch.zeros((0,), dtype=torch.long)
        self.last_scores = torch.zeros((0,))

    def clear(self) -> None:
        self.memories = []

    def route(self, inp: torch.Tensor, start_cols: torch.Tensor, key_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = inp.shape[0], inp.shape[1]
        if not self.memories:
            return torch.full((rows,), -1, dtype=torch.long), torch.zeros(rows)
        cols = torch.arange(width, device=inp.device)
        mask = (cols[None, :] >= start_cols.to(inp.device)[:, None]) & (cols[None, :] <= key_cols.to(inp.device)[:, None])
        scores = torch.stack([activation_scores(inp.float(), m.delta.to(inp.device), mask).cpu()
                              for m in self.memories], dim=1)  # [rows, M]
        eps = torch.tensor([m.eps for m in self.memories])
        active = scores > eps[None, :]
        masked = torch.where(active, scores, torch.full_like(scores, float("-inf")))
        best_s, best = masked.max(dim=1)
        route = torch.where(torch.isfinite(best_s), best, torch.full_like(best, -1))
        return route, scores.max(dim=1).values

    def _apply(self, inp: torch.Tensor, out: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        new = out
        for j, m in enumerate(self.memories):
            rows = (route == j).nonzero().flatten().tolist()
            if not rows:
                continue
            if new is out:
                new = out.clone()
            r = torch.tensor(rows, device=out.device)
            new[r] = out[r] + (inp[r].float() @ m.delta.to(out.device).t()).to(out.dtype)
        return new

    def on_full(self, inp, out, start_cols, key_cols):
        route, best = self.route(inp, start_cols, key_cols)
        self.last_route, self.last_scores = route, best
        return self._apply(inp, out, route), route

    def on_step(self, inp, out, state):
        return out if state is None else self._apply(inp, out, state)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.module.encode())
        for m in self.memories:
            h.update(f"{m.eps!r}|{float(m.delta.double().sum())!r}|{float(m.delta.double().abs().sum())!r}".encode())
        return h.hexdigest()[:16]


class WiseSystem(AdaptorSystem):
    """A model with WISE side memories (see the module docstring)."""

    adaptor: WiseAdaptor

    def __repr__(self) -> str:
        return f"WiseSystem(model={self.lm.name!r}, module={self.adaptor.module!r}, memories={len(self.adaptor.memories)})"


# ============================================================================================ training
#: short factual cloze prompts about general topics (no people, places or works of the shipped datasets), used
#: as irrelevant inputs of the routing loss together with held-out prose
_GENERIC_CLOZE = ("Water boils at a temperature of", "The chemical symbol for gold is", "The largest planet in the solar "
                  "system is", "A week has a total of", "The opposite of hot is", "Bees make a sweet food called",
                  "The primary colours are red, blue and", "A triangle has a total of", "Ice is the solid form of",
                  "The fastest land animal is the", "Photosynthesis takes place in the", "The freezing point of "
                  "water is")


#: subjects that fill an edit's own template to make its *contrast prompts* (same relation, another subject:
#: the shape of CounterFact's neighbourhood prompts), by type. The router is trained against the contrasts of the
#: edited subject's own kind (see :func:`nearest_contrasts`), so every kind CounterFact-style facts are about needs
#: enough members here. None of them is a subject of tests/integration/test_wise_locality_smollm.py, whose
#: neighbourhood prompts stay held out.
_CONTRAST_POOL: dict[str, tuple[str, ...]] = {
    "country": ("Canada", "Mexico", "Egypt", "Kenya", "Sweden", "Argentina", "Vietnam", "Norway", "Peru", "Poland",
                "Greece", "Chile", "India", "Australia", "Spain", "Portugal", "Turkey", "Iran", "Nigeria",
                "Indonesia", "Cuba", "Ireland", "Finland", "Morocco", "Pakistan"),
    "city": ("Chicago", "Cairo", "Sydney", "Toronto", "Mumbai", "Istanbul", "Dublin", "Moscow", "Barcelona",
             "Venice", "Vienna", "Amsterdam", "Berlin", "Lisbon", "Prague", "Buenos Aires", "Nairobi", "Shanghai",
             "Seattle", "Melbourne", "Athens", "Stockholm", "Kyoto", "Havana", "Boston"),
    "person": ("Wolfgang Amadeus Mozart", "Napoleon Bonaparte", "Cleopatra", "Mahatma Gandhi", "Nelson Mandela",
               "Galileo Galilei", "Frida Kahlo", "Queen Victoria", "Charles Dickens", "Vincent van Gogh",
               "Johann Sebastian Bach", "Marco Polo", "Albert Einstein", "Isaac Newton", "Marie Curie",
               "Abraham Lincoln", "Julius Caesar", "Leo Tolstoy", "Ludwig van Beethoven", "Confucius",
               "Winston Churchill", "Ernest Hemingway", "Florence Nightingale", "Nikola Tesla", "Joan of Arc"),
    "written work": ("The Odyssey", "War and Peace", "Moby-Dick", "The Divine Comedy", "Jane Eyre", "Frankenstein",
                     "Les Misérables", "The Iliad", "Don Quixote", "Macbeth", "Othello", "King Lear",
                     "Crime and Punishment", "Anna Karenina", "Wuthering Heights", "Great Expectations",
                     "Oliver Twist", "The Canterbury Tales", "Paradise Lost", "Ulysses", "The Catcher in the Rye",
                     "To Kill a Mockingbird", "Nineteen Eighty-Four", "Brave New World", "Dracula",
                     "Madame Bovary", "The Hobbit"),
    "artwork or music": ("Guernica", "The Night Watch", "The Birth of Venus", "Don Giovanni", "The Creation of Adam",
                         "The Persistence of Memory", "Girl with a Pearl Earring", "American Gothic", "The Thinker",
                         "Water Lilies", "The Kiss", "Las Meninas", "The Garden of Earthly Delights",
                         "The School of Athens", "Swan Lake", "The Magic Flute", "The Four Seasons", "Carmen",
                         "The Nutcracker", "The Great Wave off Kanagawa", "Sunflowers", "Liberty Leading the People",
                         "The Raft of the Medusa", "The Arnolfini Portrait", "The Ninth Symphony"),
    "organisation": ("Toyota", "Nokia", "the United Nations", "Coca-Cola", "Samsung", "Boeing", "Volkswagen",
                     "Nintendo", "Siemens", "Ford", "IBM", "Sony", "Microsoft", "Nestlé", "IKEA", "Honda",
                     "Airbus", "Intel", "Netflix", "the Red Cross", "NASA", "the BBC", "Adidas", "Ferrari",
                     "the World Bank"),
    "substance": ("carbon", "helium", "copper", "nitrogen", "silver", "uranium", "calcium", "zinc", "lead",
                  "mercury", "platinum", "neon", "hydrogen", "potassium", "magnesium", "aluminium", "tin",
                  "chlorine", "sulfur", "nickel", "titanium", "lithium", "cobalt", "argon", "tungsten"),
    "place or building": ("Mount Everest", "the Amazon River", "Stonehenge", "the Sahara Desert",
                          "the Golden Gate Bridge", "Lake Victoria", "the Panama Canal", "Mount Kilimanjaro",
                          "the Louvre", "the Acropolis", "the Kremlin", "Niagara Falls", "the Taj Mahal",
                          "the Sydney Opera House", "the Parthenon", "Machu Picchu", "the Leaning Tower of Pisa",
                          "the Brandenburg Gate", "the Sagrada Família", "Buckingham Palace",
                          "the Empire State Building", "the Burj Khalifa", "Mount Fuji", "the Grand Canyon",
                          "Angkor Wat", "the Alhambra", "the CN Tower"),
}
#: the pool's subjects with the types interleaved, so that any window of the tuple mixes every type
_CONTRAST_SUBJECTS: tuple[str, ...] = tuple(
    group[i] for i in range(max(map(len, _CONTRAST_POOL.values()))) for group in _CONTRAST_POOL.values()
    if i < len(group))


def _same_text(a: str, b: str) -> bool:
    """Whether two prompts are the same text up to case, spacing and final punctuation."""
    def norm(p: str) -> str:
        return " ".join(p.casefold().split()).rstrip(" .,:;?!")
    return norm(a) == norm(b)


def irrelevant_prompts(n: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` irrelevant prompts: alternately generic factual cloze prompts and held-out prose (first 16 words).

    A prompt that is the same text as one in ``exclude`` (the edit prompts: case, spacing and final punctuation
    ignored) is left out — the router cannot put one input both above and below its threshold.
    """
    text = (Path(__file__).resolve().parents[1] / "resources" / "heldout.txt").read_text()
    sents = [" ".join(s.split()[:16]) for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    out: list[str] = []
    for a, b in zip(_GENERIC_CLOZE, sents):
        out += [a, b]
    return [p for p in out if not any(_same_text(p, e) for e in exclude)][:n]


def contrast_prompts(template: str, subject: str, n_train: int, n_calibration: int,
                     exclude_subjects: Sequence[str] = (), exclude_prompts: Sequence[str] = ()
                     ) -> tuple[list[str], list[str]]:
    """Contrast prompts of one rewrite: its template filled with other subjects, ``(train, calibration)``.

    Each rewrite gets its own window of :data:`_CONTRAST_SUBJECTS` (by a hash of template and subject, so edits
    of one batch do not all share the same contrasts); the first ``n_train`` prompts train the router below its
    threshold, the next ``n_calibration`` are held out for calibrating the threshold. Subjects in
    ``exclude_subjects`` (case-insensitive: the subjects edited into the same memory) and prompts that are the
    same text as one of ``exclude_prompts`` (the edit prompts) are skipped. A template without ``{}`` has none.
    """
    if "{}" not in template:
        return [], []
    skip = {x.casefold() for x in exclude_subjects} | {subject.casefold()}
    k = len(_CONTRAST_SUBJECTS)
    start = int(hashlib.sha256(f"{template}\x00{subject}".encode()).hexdigest(), 16) % k
    out: list[str] = []
    for j in range(k):
        if len(out) == n_train + n_calibration:
            break
        subj = _CONTRAST_SUBJECTS[(start + j) % k]
        p = fill_template(template, subj)
        if subj.casefold() in skip or any(_same_text(p, e) for e in exclude_prompts):
            continue
        out.append(p)
    return out[:n_train], out[n_train:]


def nearest_contrasts(edit_vec: torch.Tensor, cand_vecs: torch.Tensor, n_train: int, n_calibration: int
                      ) -> tuple[list[int], list[int]]:
    """The contrast candidates most like the edit prompt, ``(train indices, calibration indices)``.

    ``edit_vec`` and the rows of ``cand_vecs`` are mean prompt activations (the router's input averaged over the
    prompt tokens). All are centred on the candidates' mean, which removes what every prompt of the template
    shares, and the candidates are ranked by the cosine of their centred vector with the edit's (highest first;
    ties: the earlier candidate first). The ``n_train + n_calibration`` nearest are taken: the calibration prompts
    are evenly spaced ranks among them (so the held-out prompts that set the threshold are as near as the trained
    ones), the rest train the router. With fewer candidates, training keeps its ``n_train`` and calibration gets
    the rest.
    """
    if len(cand_vecs) == 0:
        return [], []
    centre = cand_vecs.double().mean(0)
    sim = torch.nn.functional.cosine_similarity(cand_vecs.double() - centre, (edit_vec.double() - centre)[None],
                                                dim=-1).tolist()
    order = sorted(range(len(sim)), key=lambda i: (-sim[i], i))
    n = min(len(order), n_train + n_calibration)
    n_cal = n_calibration if n == n_train + n_calibration else max(0, n - n_train)
    cal_ranks = {int((k + 0.5) * n / n_cal) for k in range(n_cal)}
    return ([order[j] for j in range(n) if j not in cal_ranks], [order[j] for j in sorted(cal_ranks)])


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the activation it needs is recorded."""


def _mean_acts(lm: "LM", module: str, prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """The input of ``module`` averaged over each prompt's tokens, ``[n, d_in]`` (the layers above are not run)."""
    store: list[torch.Tensor] = []

    def hook(_m: Any, args: tuple) -> None:
        store.append(args[0].detach().float())
        raise _Stop

    ids = [ops.encode(lm.tokenizer, p) for p in prompts]
    out = []
    h = lm.module(module).register_forward_pre_hook(hook)
    try:
        for a in range(0, len(ids), chunk):
            batch = ops.pad_left(ids[a:a + chunk], ops._pad_id(lm), lm.device)
            store.clear()
            try:
                with torch.no_grad():
                    lm.model(**batch, logits_to_keep=1, use_cache=False)
            except _Stop:
                pass
            m = batch["attention_mask"].to(store[0].dtype)[..., None]
            out.append(((store[0] * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
    finally:
        h.remove()
    return torch.cat(out) if out else torch.zeros((0, 0))


def _prompt_acts(lm: "LM", module: str, prompts: Sequence[str], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of ``module`` for each prompt, left-padded ``[n, width, d_in]``, and the token mask ``[n, width]``."""
    ids = [ops.encode(lm.tokenizer, p) for p in prompts]
    width = max(len(i) for i in ids)
    acts, masks = [], []
    for a in range(0, len(ids), chunk):
        batch = ops.pad_left(ids[a:a + chunk], ops._pad_id(lm), lm.device)
        with torch.no_grad(), record_io(lm.model, [module], kind="input") as rec:
            lm.model(**batch, logits_to_keep=1, use_cache=False)
        x, m = rec[module].float(), batch["attention_mask"].bool()
        extra = width - x.shape[1]  # left-pad every chunk to the longest prompt of all
        acts.append(torch.nn.functional.pad(x, (0, 0, extra, 0)))
        masks.append(torch.nn.functional.pad(m, (extra, 0), value=False))
    return torch.cat(acts), torch.cat(masks)


def train_shard(lm: "LM", module: str, delta0: torch.Tensor, mask: torch.Tensor, prompts: Sequence[str],
                targets: Sequence[str], irr: tuple[torch.Tensor, torch.Tensor], hp: WiseHParams,
                kept: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """Train one shard's side-memory difference from ``delta0`` under the gradient ``mask``.

    The routing loss holds the shard's ``prompts`` and the memory's earlier edit prompts ``kept`` above the
    irrelevant inputs ``irr`` (activations of the projection's input do not depend on ``Δ``: no replay of the
    earlier edits' targets is needed for their routing).
    """
    batch, key_cols, tids = prompt_target_batch(lm, prompts, targets)
    e_acts, e_mask = _prompt_acts(lm, module, list(prompts) + list(kept))
    i_acts, i_mask = irr
    d = delta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=hp.lr)
    fmask = mask.to(d.dtype)

    def hook(_m: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + (args[0].float() @ d.t()).to(out.dtype)

    h = lm.module(module).register_forward_hook(hook)
    stats = {"nll": float("inf"), "route": float("inf"), "steps": 0.0}
    try:
        for step in range(hp.n_iter + 1):
            nll = target_nll(lm, batch, key_cols, tids)
            la = routing_loss(activation_scores(e_acts, d, e_mask), activation_scores(i_acts, d, i_mask),
                              hp.alpha, hp.beta, hp.gamma)
            stats.update(nll=float(nll.detach()), route=float(la.detach()), steps=float(step))
            if step == hp.n_iter or (stats["nll"] < hp.loss_stop and stats["route"] == 0.0):
                break
            opt.zero_grad()
            (nll + la).backward()
            d.grad.mul_(fmask)
            opt.step()
    finally:
        h.remove()
    return d.detach(), stats


@register_method("wise")
class WiseEditor(Editor):
    """WISE as an editing method: the Edit's system is a :class:`WiseSystem`; ``undo()`` drops the side memories."""

    hparams_class = WiseHParams
    edits_weights = False  # the edit lives outside the weights (Edit.save_pretrained refuses it)

    def apply(self, lm: "LM", cases: Sequence["EditCase"], hparams: HParams, *, evk_align: Any = None,
              progress: bool = True, sequence: SequenceState | None = None) -> Edit:
        assert isinstance(hparams, WiseHParams)
        hp = hparams
        module = lm.arch.mlp_out_at(hp.layer_index(lm))
        def make() -> WiseSystem:
            return WiseSystem(self.base_system(lm), WiseAdaptor(module))

        system: WiseSystem = (make() if sequence is None else
                              sequence.kept("wise_system", make, lambda s: s.adaptor.clear))
        ad = system.adaptor
        w = weight_view(lm.module(module))
        if not ad.memories or (hp.edits_per_memory and len(ad.memories[-1].prompts) >= hp.edits_per_memory):
            ad.memories.append(SideMemory(torch.zeros(w.shape, dtype=torch.float32, device=w.device)))
        mem = ad.memories[-1]
        rewrites = [r for c in cases for r in c.rewrites]
        items = [(system.format.apply(r.text), r.target_new) for r in rewrites]
        kept = list(mem.prompts)  # the memory's earlier edit prompts
        g = torch.Generator().manual_seed(hp.seed * 7919 + len(kept))
        def sample(old: list, n: int) -> list:  # bounded cost in long sequential runs
            return old if len(old) <= n else [old[i] for i in sorted(torch.randperm(len(old), generator=g)[:n].tolist())]

        replay = sample(list(zip(mem.prompts, mem.targets)), hp.n_replay)
        mem.targets.extend(t for _, t in items)
        mem.subjects |= {r.subject for r in rewrites}
        mem.texts.extend(r.text for r in rewrites)
        mem.prompts.extend(p for p, _ in items)
        # negatives: generic prompts that are not one of the edit prompts, and each edit's template filled with
        # other subjects (trained below the threshold, or held out to calibrate it); earlier contrasts that now
        # are an edit prompt or name an edited subject are dropped
        def clash(p: str) -> bool:
            return any(_same_text(p, e) for e in mem.prompts) or any(
                re.search(rf"(?<!\w){re.escape(sj)}(?!\w)", p, flags=re.IGNORECASE) for sj in mem.subjects)

        # contrasts of the edited subject's own kind: the router cannot tell a fact from its relation unless it is
        # trained against the same relation about *similar* subjects (another novel for a novel's author)
        need = hp.n_contrast + hp.n_calibration
        n_pool = len(_CONTRAST_SUBJECTS) if hp.contrast_pool == 0 else max(hp.contrast_pool, need)
        pools = [[system.format.apply(p) for p in contrast_prompts(r.prompt, r.subject, n_pool, 0,
                                                                   sorted(mem.subjects), mem.texts)[0]]
                 for r in rewrites]
        ranked = need > 0 and any(len(pl) > need for pl in pools)
        if ranked:
            vecs = _mean_acts(lm, module, [p for p, _ in items] + [p for pl in pools for p in pl])
            at = len(items)
        new_con, new_cal = [], []
        for i, pl in enumerate(pools):
            if ranked:
                tr_i, ca_i = nearest_contrasts(vecs[i], vecs[at:at + len(pl)], hp.n_contrast, hp.n_calibration)
                at += len(pl)
            else:
                tr_i, ca_i = list(range(min(len(pl), hp.n_contrast))), list(range(hp.n_contrast, min(len(pl), need)))
            new_con += [pl[j] for j in tr_i]
            new_cal += [pl[j] for j in ca_i]
        mem.contrasts = [p for p in mem.contrasts if not clash(p)]
        mem.calibration = [p for p in mem.calibration if not clash(p)]
        generic = [system.format.apply(p) for p in irrelevant_prompts(hp.n_irrelevant, exclude=mem.texts)]
        train_neg = generic + new_con + sample(mem.contrasts, max(64, len(new_con)))
        calib_neg = new_cal + sample(mem.calibration, max(128, len(new_cal)))
        mem.contrasts.extend(new_con)
        mem.calibration.extend(new_cal)
        if not train_neg:
            raise HParamsError("method 'wise' has no irrelevant prompts to train its router against: set "
                               "'n_irrelevant' or 'n_contrast' above 0")
        irr = _prompt_acts(lm, module, train_neg)
        step = sequence.step if sequence is not None else 0
        taus, diag = [], {}
        with torch.enable_grad():
            for s in range(min(hp.n_shards, len(items))):
                shard = items[s::hp.n_shards] + replay  # earlier edits keep their targets
                gen = torch.Generator().manual_seed(hp.seed * 1_000_003 + step * 101 + s)
                mask = (torch.rand(w.shape, generator=gen) < hp.mask_ratio).to(w.device)
                d, st = train_shard(lm, module, mem.delta, mask, [p for p, _ in shard], [t for _, t in shard], irr, hp,
                                    kept=[p for p in kept if p not in {q for q, _ in replay}])
                taus.append(d - mem.delta)
                for k, v in st.items():
                    diag[f"loss/shard{s}_{k}"] = v
        mem.delta = mem.delta + ties_merge(taus, hp.ties_density).to(mem.delta.device)
        e_acts, e_mask = _prompt_acts(lm, module, mem.prompts)
        e_scores = activation_scores(e_acts, mem.delta, e_mask).tolist()
        i_scores = activation_scores(irr[0], mem.delta, irr[1]).tolist()
        c_scores: list[float] = []
        if calib_neg:
            c_acts, c_mask = _prompt_acts(lm, module, calib_neg)
            c_scores = activation_scores(c_acts, mem.delta, c_mask).tolist()
        mem.eps, separated = calibrate_threshold(e_scores, i_scores + c_scores)
        system.refresh()
        diag.update({"side_memories": len(ad.memories), "threshold": mem.eps, "router_separated": separated,
                     "score_edit_min": min(e_scores), "score_irrelevant_max": max(i_scores),
                     "n_negatives_train": len(train_neg), "n_negatives_calibration": len(calib_neg),
                     "delta_norm/side": float(mem.delta.norm())})
        if c_scores:
            diag["score_calibration_max"] = max(c_scores)
        if sequence is not None:
            return Edit(system, self.name, cases, hparams, diag, lm=lm, undoable=False)

        def undo() -> None:
            ad.clear()
            system.refresh()

        return Edit(system, self.name, cases, hparams, diag, lm=lm, on_undo=undo)
