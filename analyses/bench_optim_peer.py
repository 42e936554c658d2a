"""Benchmark: UnitNaturalGradient side by side with ASDL's unit-wise natural gradient.

The peer is ASDL (package ``asdfghjkl`` 0.1a5, import name ``asdl``): ``NaturalGradientMaker``
with ``fisher_type="fisher_emp"`` and ``fisher_shape="unit_wise"``, followed by
``torch.optim.SGD``.  ``tests/test_optim_peer.py`` shows that its step is the unit natural gradient
of the paper's Theorem 1 (Clevert et al., ICLR 2016, Section 2): for each unit the damped solve
``(F_u + λI)⁻¹ (g, g₀)`` with the empirical unit Fisher ``F_u = (1/N) Σ_n g_nu g_nuᵀ``, the same
as ours with ``damping_mode="absolute"`` when both refresh every step.

The problem, the same for every setting: the paper's 8x128 ELU MLP
(:func:`biasshift.models.paper_mlp`) on a fixed subset of the MNIST training set (the embedded
digits set, 64 inputs, when MNIST is not under ``$BIASSHIFT_DATA``), mean cross-entropy, batch 64,
float32, one thread, the same initial weights and the same batch order for all settings.  A
*step* is what a training loop pays: forward, ``zero_grad``, backward and the optimiser's step
(for ASDL: ``forward_and_backward()``, which runs the forward and backward passes itself, then
``SGD.step()``).  Settings:

* ``sgd`` — ``torch.optim.SGD(lr)``, the reference;
* ``ours defaults`` — ``UnitNaturalGradient(model, lr)``: relative damping ``ρ = 0.1`` (``λ =
  ρ`` times the layer's mean diagonal Fisher entry), the network trust region with ``κ = 0.1``,
  ``update_every=20``, ``inverse_every=200``, ``ema=0.95`` (the optimiser's defaults; its
  settings are printed and written with the results);
* ``ours matched λ`` — the same with ``damping_mode="absolute"``, ``damping=λ`` (ASDL's) and
  ``kl_clip=None``;
* ``asdl matched λ`` — ``damping=λ`` (absolute), ``ema_decay = 1 − ema`` (ASDL's decay is the
  weight of the *new* batch), ``curvature_upd_interval=10`` (= ``update_every``),
  ``preconditioner_upd_interval=100`` (= ``inverse_every``), ``data_size`` = the batch size.

One matched pair per ``--damping`` value λ (default ``1e-3`` and ``1e-1``).
``--asdl-bias-correction`` adds ``asdl+bc matched λ``: ASDL inverting the
bias-corrected moving average ``F / (1 − ema^k)`` as ours does (a wrapper around its
``update_preconditioner``; ``tests/test_optim_peer.py`` shows that with it, refreshed every
step, ASDL takes our steps exactly).

What the libraries do differently even when matched (printed with the table):

* ASDL's moving average is not bias-corrected: after ``k`` updates its Fisher is ``(1 − ema^k)``
  times ours.  Its first (and, for 100 steps, only) inverse is of ``(1 − ema)·F₁ + λI``,
  i.e. ``20·(F₁ + 20λI)⁻¹`` at ``ema = 0.95``: twenty times our step, with twenty times the damping.
* ASDL folds in a batch exactly at steps ``0, 10, 20, ...`` and inverts exactly at
  ``0, 100, 200, ...``.  Ours updates on every step until the EMA holds ``⌈1/(1 − ema)⌉ = 20``
  batches, then every ``update_every``; it refreshes the factors whenever half the EMA's weight
  is newer than them, and at least every ``inverse_every`` steps.
* ASDL inverts (``torch.inverse``) and multiplies; ours factors by Cholesky and solves.

The settings run interleaved in one process (round-robin, ``--chunk`` steps per setting per
round), so machine load hits all of them alike.  Per setting: the median step time (a step
without an update or refresh), the mean (updates and refreshes amortised over the same
schedule), both also as ratios to SGD's; the mean cross-entropy on the whole training subset
before training and after ``--steps`` steps, and whether it stayed finite.  A setting that
diverges (a :class:`~biasshift.optim.DivergenceError` from ours, a non-finite loss at a check for
any) stops there and is reported as such (ours leaves a non-finite direction out of the
parameters and raises at the next refresh; ASDL goes on with NaN weights).

    python analyses/bench_optim_peer.py                 # 300 steps (4 min on 2 loaded cores)
    python analyses/bench_optim_peer.py --quick         # 50 steps, the first damping only
    python analyses/bench_optim_peer.py --out runs/bench_optim_peer.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.data import DatasetNotFoundError, load_dataset
from biasshift.models import paper_mlp
from biasshift.optim import DivergenceError, UnitNaturalGradient


def stub_nvtx() -> None:
    """ASDL calls ``torch.cuda.nvtx.range_push/range_pop`` (through ``nvtx.range``), which raise
    on CPU builds of torch: make them no-ops there (before ASDL is used)."""
    if torch.cuda.is_available():
        return
    torch.cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]


def import_asdl() -> Any:
    stub_nvtx()
    try:
        import asdl
    except ImportError as e:
        sys.exit(f"bench_optim_peer: ASDL is not installed ({e}); install it with\n"
                 "  pip install --no-deps -r requirements-peer.txt")
    return asdl


def load_subset(n: int, seed: int) -> tuple[Tensor, Tensor, str]:
    """A fixed subset of ``n`` training samples of MNIST, or of digits when MNIST is absent."""
    data_dir = os.environ.get("BIASSHIFT_DATA")
    try:
        ds = load_dataset("mnist", data_dir=data_dir, download=False)
        name = "mnist"
    except DatasetNotFoundError as e:  # a corrupt file raises: never silently another dataset
        print(f"MNIST not found under BIASSHIFT_DATA={data_dir!r} ({str(e).splitlines()[0]}); "
              "using the embedded digits set (64 inputs) instead")
        ds = load_dataset("digits")
        name = "digits"
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ds.train_x.shape[0], generator=g)[:n]
    x = ds.train_x[idx].to(torch.float32).reshape(len(idx), -1).contiguous()
    return x, ds.train_y[idx].contiguous(), name


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches for ``steps`` steps: epochs of a seeded permutation, last partial dropped."""
    if n < batch:
        raise ValueError(f"bench_optim_peer: the subset ({n}) is smaller than a batch ({batch})")
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i:i + batch] for i in range(0, n - batch + 1, batch))
    return out[:steps]


@torch.no_grad()
def full_loss(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 4096) -> float:
    was = model.training
    model.eval()
    total = sum(F.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk], reduction="sum").item()
                for i in range(0, x.shape[0], chunk))
    model.train(was)
    return total / x.shape[0]


class Run:
    """One setting: its model copy, its step function, its timings and losses."""

    def __init__(self, name: str, model: nn.Module, step: Callable[[Tensor, Tensor], Tensor],
                 config: dict[str, Any]) -> None:
        self.name, self.model, self.step, self.config = name, model, step, config
        self.times: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.stopped: str | None = None
        self.last_loss: Tensor | None = None  # the latest batch loss (checked between rounds)


def build_runs(args: argparse.Namespace, in_features: int, asdl: Any) -> list[Run]:
    torch.manual_seed(args.seed)
    init = paper_mlp("elu", in_features=in_features)

    def copy() -> nn.Module:
        m = paper_mlp("elu", in_features=in_features)
        m.load_state_dict(init.state_dict())
        return m.train()

    runs = []
    m = copy()
    sgd = torch.optim.SGD(m.parameters(), lr=args.lr)
    runs.append(Run("sgd", m, plain_step(m, sgd), dict(optimizer="torch.optim.SGD", lr=args.lr)))

    def ours(name: str, **kw: Any) -> None:
        m = copy()
        opt = UnitNaturalGradient(m, lr=args.lr, **kw)
        g = opt.param_groups[0]
        cfg = {k: g[k] for k in ("lr", "damping", "damping_mode", "kl_clip", "trust_region",
                                 "ema", "update_every", "inverse_every")}
        runs.append(Run(name, m, plain_step(m, opt),
                        dict(optimizer="biasshift.optim.UnitNaturalGradient", **cfg)))

    def theirs(name: str, damping: float, bias_correct: bool = False) -> None:
        m = copy()
        cfg = asdl.PreconditioningConfig(
            data_size=args.batch, damping=damping, ema_decay=1.0 - args.ema,
            curvature_upd_interval=args.update_every,
            preconditioner_upd_interval=args.inverse_every)
        gm = asdl.NaturalGradientMaker(m, cfg, fisher_type="fisher_emp", fisher_shape="unit_wise")
        if bias_correct:
            bias_correct_asdl(gm, args.ema)
        sgd = torch.optim.SGD(m.parameters(), lr=args.lr)

        def asdl_step(x: Tensor, y: Tensor) -> Tensor:
            sgd.zero_grad(set_to_none=True)
            dummy_y = gm.setup_model_call(m, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, y)
            _, loss = gm.forward_and_backward()
            sgd.step()
            return loss.detach()

        runs.append(Run(name, m, asdl_step, dict(
            optimizer="asdl.NaturalGradientMaker + torch.optim.SGD", fisher_type="fisher_emp",
            fisher_shape="unit_wise", lr=args.lr, damping=damping, damping_mode="absolute",
            ema_decay=1.0 - args.ema, curvature_upd_interval=args.update_every,
            preconditioner_upd_interval=args.inverse_every, data_size=args.batch,
            kl_clip=None, bias_corrected_inverse=bias_correct)))

    ours("ours defaults")
    for lam in args.damping:
        ours(f"ours matched {lam:g}", damping=lam, damping_mode="absolute", kl_clip=None,
             ema=args.ema, update_every=args.update_every, inverse_every=args.inverse_every)
        theirs(f"asdl matched {lam:g}", lam)
        if args.asdl_bias_correction:
            theirs(f"asdl+bc matched {lam:g}", lam, bias_correct=True)
    return runs


def bias_correct_asdl(gm: Any, ema: float) -> None:
    """Make ASDL invert the bias-corrected EMA, as ours does: ``F / (1 − ema^k)`` after ``k``
    Fisher updates (its running Fisher is scaled up for the inversion and back after it)."""
    update_curvature, update_preconditioner = gm.update_curvature, gm.update_preconditioner
    updates = [0]

    def counted() -> None:
        update_curvature()
        updates[0] += 1

    def corrected() -> None:
        c = 1.0 / (1.0 - ema ** max(updates[0], 1))
        gm._scale_fisher(c)
        update_preconditioner()
        gm._scale_fisher(1.0 / c)

    gm.update_curvature, gm.update_preconditioner = counted, corrected


def plain_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Tensor, Tensor], Tensor]:
    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


DIFFERENCES = [
    "damping: 'ours defaults' is relative (lambda = rho x the layer's mean diagonal entry, "
    "rho = 0.1); ASDL's is "
    "absolute (lambda added to the block diagonal, bias included), and 'ours matched' uses it "
    "with the same lambda",
    "EMA: ASDL's ema_decay = 1 - ema weighs the new batch and is not bias-corrected: its Fisher "
    "after k updates is (1 - ema^k) x ours; its first inverse (used for inverse_every steps) is "
    "of (1 - ema) F_1 + lambda I = (1 - ema) (F_1 + lambda/(1 - ema) I)",
    "schedule: ASDL updates the Fisher at steps 0, u, 2u, ... and inverts at 0, i, 2i, ...; ours "
    "updates every step until the EMA holds ceil(1/(1 - ema)) batches, then every u, and "
    "refreshes when half the EMA's weight is newer than the factors, at least every i steps",
    "solve: ASDL torch.inverse + matmul per step; ours Cholesky + two triangular solves",
    "step size: 'ours defaults' bounds the batch's Fisher along every whole step (network "
    "trust region, kappa = 0.1); ASDL has no clip, "
    "nor has 'ours matched'",
]


def json_safe(obj: Any) -> Any:
    """NaN/inf (a diverged setting's loss) as ``None`` for strict JSON (``finite`` says why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per setting")
    ap.add_argument("--quick", action="store_true", help="50 steps")
    ap.add_argument("--chunk", type=int, default=10, help="steps per setting per round")
    ap.add_argument("--eval-every", type=int, default=50,
                    help="steps between full-subset losses (also the divergence check)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=8192, help="samples in the fixed subset")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--damping", type=float, nargs="+", default=[1e-3, 1e-1],
                    help="absolute dampings of the matched pairs (--quick: the first only)")
    ap.add_argument("--asdl-bias-correction", action="store_true",
                    help="add 'asdl+bc' rows: ASDL inverting the bias-corrected EMA (as ours)")
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--update-every", type=int, default=10)
    ap.add_argument("--inverse-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.steps = 50
        args.damping = args.damping[:1]
        args.eval_every = min(args.eval_every, 25)
    torch.set_num_threads(args.threads)
    asdl = import_asdl()

    x, y, dataset = load_subset(args.train_size, args.seed)
    batches = batch_order(x.shape[0], args.batch, args.steps, args.seed + 1)
    runs = build_runs(args, x.shape[1], asdl)
    loss0 = full_loss(runs[0].model, x, y)
    for r in runs:
        r.curve.append((0, loss0))
    print(f"{dataset}: {x.shape[0]} training samples, {x.shape[1]} inputs, paper_mlp('elu') 8x128, "
          f"batch {args.batch}, float32, {torch.get_num_threads()} thread(s), lr {args.lr}, "
          f"{args.steps} steps, interleaved in rounds of {args.chunk} steps")

    wall0 = time.perf_counter()
    done = 0
    rnd = 0
    while done < args.steps:
        todo = min(args.chunk, args.steps - done)
        order = runs[rnd % len(runs):] + runs[:rnd % len(runs)]  # rotate who goes first
        for r in order:
            if r.stopped:
                continue
            for s in range(done, done + todo):
                xb, yb = x[batches[s]], y[batches[s]]
                t0 = time.perf_counter()
                try:
                    r.last_loss = r.step(xb, yb)
                except DivergenceError as e:
                    r.stopped = f"DivergenceError at step {s}: {str(e).splitlines()[0]}"
                    r.curve.append((s, full_loss(r.model, x, y)))
                    break
                r.times.append(time.perf_counter() - t0)
            # between rounds, outside the timing: a non-finite batch loss ends the setting
            if not r.stopped and not bool(torch.isfinite(r.last_loss)):
                r.stopped = f"non-finite batch loss at step {done + todo - 1}"
                r.curve.append((done + todo, full_loss(r.model, x, y)))
        done += todo
        rnd += 1
        if done % args.eval_every == 0 or done == args.steps:
            for r in runs:
                if r.stopped:
                    continue
                loss = full_loss(r.model, x, y)
                r.curve.append((done, loss))
                if not math.isfinite(loss):
                    r.stopped = f"non-finite loss {loss} at step {done}"
    wall = time.perf_counter() - wall0

    base = runs[0]
    base_med, base_mean = statistics.median(base.times), statistics.fmean(base.times)
    results: dict[str, Any] = {}
    head = (f"{'setting':20s} {'median ms':>10s} {'x SGD':>6s} {'mean ms':>9s} {'x SGD':>6s} "
            f"{'max ms':>8s} {'steps':>5s} {'loss 0':>7s} {'loss end':>9s}  finite")
    print(head)
    for r in runs:
        med = statistics.median(r.times) if r.times else float("nan")
        mean = statistics.fmean(r.times) if r.times else float("nan")
        final = r.curve[-1][1]
        finite = r.stopped is None and math.isfinite(final)
        results[r.name] = dict(
            config=r.config, median_s=med, mean_s=mean, max_s=max(r.times, default=float("nan")),
            median_ratio_to_sgd=med / base_med, mean_ratio_to_sgd=mean / base_mean,
            steps_run=len(r.times), loss_initial=loss0, loss_final=final,
            loss_final_step=r.curve[-1][0], finite=finite, stopped=r.stopped,
            loss_curve=[dict(step=s, loss=v) for s, v in r.curve])
        print(f"{r.name:20s} {med * 1e3:10.2f} {med / base_med:6.1f} {mean * 1e3:9.2f} "
              f"{mean / base_mean:6.1f} {max(r.times, default=float('nan')) * 1e3:8.1f} "
              f"{len(r.times):5d} {loss0:7.4f} {final:9.4g}  "
              + ("yes" if finite else f"NO, stopped at step {r.curve[-1][0]}"))
        if r.stopped:
            print(f"    {r.stopped}")
    print(f"(time per step: median = a step without Fisher update or refresh, mean = all steps "
          f"run (of {args.steps}; a setting that stopped early has its first, costliest steps "
          f"only); loss = mean cross-entropy on the {x.shape[0]} training samples, at the end "
          f"or where the setting stopped; {wall:.0f} s of training in all)")
    print("differences that remain in the matched settings:")
    for d in DIFFERENCES:
        print(f"  - {d}")

    if args.out is not None:
        payload = dict(
            benchmark="bench_optim_peer", argv=sys.argv[1:],
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dataset=dataset, train_size=x.shape[0], in_features=x.shape[1],
            model="paper_mlp('elu') 8x128", batch=args.batch, dtype="float32",
            threads=torch.get_num_threads(), steps=args.steps, chunk=args.chunk, lr=args.lr,
            damping_absolute=args.damping, ema=args.ema, update_every=args.update_every,
            inverse_every=args.inverse_every, seed=args.seed, wall_s=wall,
            results=results, differences=DIFFERENCES, torch=torch.__version__,
            asdfghjkl=metadata.version("asdfghjkl"), python=platform.python_version(),
            machine=platform.machine())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
