"""Cost of the BiasShiftTracker on the Fig. 2 setting: 8x128 MLP, MNIST-shaped data, SGD, batch 64.

Measures on ``--threads`` torch threads (default 1), interleaving runs with and without the
tracker (``--reps`` times, medians reported):

* seconds per plain training step (the trainer's loop on ``--steps`` mini-batches);
* seconds per tracked step (``--probe`` samples, exact Fisher, the study's damping): the extra
  time of a run that tracks ``--tracked`` of those steps, divided by ``--tracked``; and the ratio
  tracked step / training step;
* the projected training time per epoch of the study's schedule (log-spaced, 8 per decade, plus
  every epoch end, over ``--epochs`` epochs) relative to plain training, without and with the
  trainer's per-epoch evaluation (whole train and test set, 10,000-sample probe);
* with ``--epoch1``: a directly measured first epoch (the densest part of the schedule) with
  and without the tracker.

    python analyses/bench_tracking.py --data-dir ../shared/data [--device cuda] [--json out.json]

``--probe-sizes 128 512 2048`` instead times one :class:`~biasshift.BiasShiftProbe` measurement
directly (a plain PyTorch loop, SGD, batch 64) against an SGD step, interleaved, for each probe
size in float32 (default: one refinement step; and ``refine=0``) and float64, the previous
implementation (``UnitFisher.accumulate`` + ``report`` in float64, what the tracker ran before
it was built on the probe) for comparison, the flop floor (:func:`flop_floor`) and the
kernel floor (:func:`kernel_floor`: the unavoidable kernels timed as the probe calls them)::

    python analyses/bench_tracking.py --probe-sizes 128 512 2048 --reps 3 [--json out.json]

Without MNIST (no ``--data-dir``/``$BIASSHIFT_DATA``) random data of MNIST's shape is used: the
cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings

import torch
from torch import Tensor

from biasshift.data import ArrayDataset, load_dataset
from biasshift.data.base import DatasetNotFoundError
from biasshift.fisher.bias_shift_probe import BiasShiftProbe
from biasshift.fisher.unit_fisher import UnitFisher
from biasshift.models import paper_mlp
from biasshift.timing import best_of
from biasshift.timing import synchronize as _sync
from biasshift.train import Trainer
from biasshift.train.tracking import BiasShiftTracker, StepSchedule


def mnist_shaped(data_dir: str | None) -> ArrayDataset:
    try:
        return load_dataset("mnist", data_dir=data_dir, download=False)
    except (DatasetNotFoundError, TypeError):
        warnings.warn("MNIST not found: timing on random data of MNIST's shape", stacklevel=2)
        g = torch.Generator().manual_seed(0)
        return ArrayDataset("mnist-shaped", torch.rand(60000, 1, 28, 28, generator=g),
                            torch.randint(0, 10, (60000,), generator=g),
                            torch.rand(10000, 1, 28, 28, generator=g),
                            torch.randint(0, 10, (10000,), generator=g), 10)


def timed_fit(ds: ArrayDataset, device: torch.device, plugins: list, epochs: int = 1,
              act: str = "elu") -> float:
    t = Trainer(lambda: paper_mlp(act), ds, epochs=epochs, device=device, plugins=plugins,
                probe_size=0, eval_initial=False, seed=0)
    # time the training loop only (the evaluation is measured separately)
    _sync(device)
    t0 = time.perf_counter()
    for p in t.plugins:
        p.on_fit_start(t)
    for e in range(1, epochs + 1):
        t._train_epoch(e)
        t.epoch = e
    _sync(device)
    return time.perf_counter() - t0


def flop_floor(model: torch.nn.Module, probe: int, scores: int, device: torch.device) -> dict:
    r"""The flops a measurement cannot avoid with the probe's algorithms, and their time at
    ``torch.matmul``'s float32 rate on 1024² measured in this process (best of 5): a bound
    that every kernel would have to reach at the rate of the best GEMM.

    Per ``nn.Linear`` layer with ``n`` inputs and ``U`` units, on ``P`` probe rows:

    * ``P ≤ n`` (sample space, the first layer at probe 512): ``K = X̃X̃ᵀ``, ``P(P+1)/2 · n · 2``
      flops, and one Cholesky factorisation of ``P²`` per unit, ``U · P³/3``;
    * ``P > n`` (parameter space): the δ²-weighted Grams, lower triangles only,
      ``U · P · n(n+1)/2 · 2``, and two factorisations per unit (damped, and undamped for the
      paper's ``k`` and ``E_q(a)ᵀVar_q(a)⁻¹E_q(a)``), ``2 · U · n³/3``;
    * the probe pass: the forward, ``2 · P · n · U`` per layer, and ``scores`` backward passes
      of the δ rows down to every layer's net (all layers but the first), no weight gradients.

    Solves, refinement, the Theorem 1-2 algebra and the bookkeeping are left out (they are
    lower-order in flops, though not in memory traffic).
    """
    a = torch.randn(1024, 1024, device=device)
    rate = 2 * 1024**3 / best_of(lambda: a @ a, 5, device)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    P = probe
    parts = {"gram": 0.0, "cholesky": 0.0, "sample_gram": 0.0, "probe_pass": 0.0}
    for i, m in enumerate(linears):
        n, U = m.in_features, m.out_features
        if P <= n:
            parts["sample_gram"] += P * (P + 1) / 2 * n * 2
            parts["cholesky"] += U * P**3 / 3
        else:
            parts["gram"] += U * P * n * (n + 1) / 2 * 2
            parts["cholesky"] += 2 * U * n**3 / 3
        parts["probe_pass"] += 2 * P * n * U * (1 + (scores if i > 0 else 0))
    flops = sum(parts.values())
    return {"matmul_GFLOP_per_s": rate / 1e9, "flops": parts, "floor_s": flops / rate}


def kernel_floor(probe: BiasShiftProbe, device: torch.device, reps: int = 3) -> dict:
    r"""The part of a measurement no implementation of the probe's maths can skip, timed with
    the kernels the probe calls, on this probe's own rows and weights (best of ``reps``):

    * the probe pass (forward + the batched Fisher backward: the rows ``X`` and ``w = Σδ²``);
    * per layer with more rows ``P`` than inputs ``n``: the δ²-weighted Grams
      (:func:`~biasshift.fisher.bias_shift_probe._strip_gram`) and *two* Cholesky
      factorisations per unit (damped, and undamped for ``k_undamped`` and ``mean_scale_q``;
      :func:`~biasshift.theory.cholesky_ex` as the probe calls it);
    * per layer with ``P ≤ n`` (sample space): ``K = X̃X̃ᵀ`` and one ``P²`` factorisation per
      unit, in the probe's chunks.

    Left out: every solve, the refinement, the Woodbury block's assembly, the Theorem 1-2
    algebra and the host transfer. Where :func:`flop_floor` prices the flops at the GEMM
    rate, this prices them at the rates this machine's torch and LAPACK deliver for these
    shapes (small Cholesky blocks in particular run far below the GEMM rate).
    """
    from biasshift.fisher.bias_shift_probe import _strip_gram
    from biasshift.hooks import eval_mode
    from biasshift.theory import cholesky_ex

    def probe_pass():
        with eval_mode(probe.model):
            return probe._probe_pass()

    def factor_time(A: Tensor, triangle: str) -> float:
        """One factorisation of the blocks ``A`` in place of a copy (the copy's time taken
        off: the probe factors its blocks in their own memory)."""
        work = A.clone()
        both = best_of(lambda: cholesky_ex(work.copy_(A), triangle=triangle, overwrite=True,
                                            clean=False), reps, device)
        return max(0.0, both - best_of(lambda: work.copy_(A), reps, device))

    parts = {"probe_pass": best_of(probe_pass, reps, device), "gram": 0.0, "cholesky": 0.0}
    X, W, _ = probe_pass()
    for name in probe.layers:
        Xa = X[name][:, 0, 1:].to(probe.dtype)
        P, n = Xa.shape
        Xc = Xa - Xa.mean(0)
        w = (W[name].to(probe.dtype) / P).T.contiguous()  # (units, P)
        U = w.shape[0]
        if P <= n:
            parts["gram"] += best_of(lambda Xc=Xc: Xc @ Xc.T, reps, device)
            K = Xc @ Xc.T
            per_chunk = 4 * P * P * Xc.element_size()
            chunk = max(1, min(U, probe.memory_budget // max(1, per_chunk)))
            d = w.clamp_min(0).sqrt()
            for u0 in range(0, U, chunk):
                ds = d[u0:u0 + chunk]
                C = ds.unsqueeze(-1) * K * ds.unsqueeze(-2)
                C.diagonal(dim1=-2, dim2=-1).add_(1e-3 * C.diagonal(dim1=-2, dim2=-1).mean())
                parts["cholesky"] += factor_time(C, "both")
        else:
            parts["gram"] += best_of(lambda Xc=Xc, w=w: _strip_gram(Xc, w, probe.memory_budget),
                                      reps, device)
            G = _strip_gram(Xc, w, probe.memory_budget)
            G.diagonal(dim1=-2, dim2=-1).add_(1e-3 * G.diagonal(dim1=-2, dim2=-1).mean())
            parts["cholesky"] += 2 * factor_time(G, "upper")  # damped and undamped
    return {"parts_s": parts, "floor_s": sum(parts.values())}


def bench_probe(sizes: list[int], reps: int, damping: float, device: torch.device) -> dict:
    """Seconds per SGD step and per probe measurement (interleaved, medians) per probe size."""
    g = torch.Generator().manual_seed(0)
    model = paper_mlp("elu").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(64, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)

    def sgd_steps(k: int = 20) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        _sync(device)
        return (time.perf_counter() - t0) / k

    def measure(probe: BiasShiftProbe) -> float:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        _sync(device)
        t0 = time.perf_counter()
        with probe.measure() as m:
            opt.step()
        m.host()  # the measurement's one host transfer
        return time.perf_counter() - t0

    def old_path(px: torch.Tensor, py: torch.Tensor) -> float:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: torch.cat([m.bias.grad[:, None], m.weight.grad.reshape(m.out_features, -1)],
                              1) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
        _sync(device)
        t0 = time.perf_counter()
        uf = UnitFisher(model, fisher="exact", dtype=torch.float64)
        model.eval()
        uf.accumulate(px, py)
        uf.report(damping, gradients=grads, condition=False)
        model.train()
        opt.step()
        return time.perf_counter() - t0

    sgd_steps(20)
    out: dict = {"sgd_step_s": [], "sizes": {}}
    for M in sizes:
        px = torch.rand(M, 1, 28, 28, generator=g).to(device)
        py = torch.randint(0, 10, (M,), generator=g).to(device)
        probes = {str(dt).replace("torch.", ""): BiasShiftProbe(model, px, py, damping=1e-3,
                                                                dtype=dt)
                  for dt in (torch.float32, torch.float64)}
        probes["float32_refine0"] = BiasShiftProbe(model, px, py, damping=1e-3,
                                                   dtype=torch.float32, refine=0)
        res: dict = {k: [] for k in [*probes, "before_float64"]}
        steps = []
        for p in probes.values():
            measure(p)  # warm-up
        for _ in range(reps):
            steps.append(sgd_steps())
            for k, p in probes.items():
                res[k].append(measure(p))
            if M <= 512:  # the old path at 2048 takes minutes
                res["before_float64"].append(old_path(px, py))
            steps.append(sgd_steps())
        t_step = statistics.median(steps)
        out["sgd_step_s"] += steps
        out["sizes"][M] = {
            k: {"seconds": statistics.median(v), "sgd_steps": statistics.median(v) / t_step}
            for k, v in res.items() if v}
        floor = flop_floor(model, M, 10, device)
        floor["sgd_steps"] = floor["floor_s"] / t_step
        out["sizes"][M]["flop_floor"] = floor
        kfloor = kernel_floor(probes["float32"], device)
        kfloor["sgd_steps"] = kfloor["floor_s"] / t_step
        out["sizes"][M]["kernel_floor"] = kfloor
        line = ", ".join(f"{k} {d['seconds'] * 1e3:.0f} ms = {d['sgd_steps']:.0f} SGD steps"
                         for k, d in out["sizes"][M].items()
                         if k not in ("flop_floor", "kernel_floor"))
        print(f"probe {M:5d}: SGD step {t_step * 1e3:.2f} ms; {line}; flop floor "
              f"{floor['floor_s'] * 1e3:.0f} ms = {floor['sgd_steps']:.0f} SGD steps (matmul "
              f"{floor['matmul_GFLOP_per_s']:.0f} GFLOP/s; GFLOP: "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in floor["flops"].items()) + "); "
              f"kernel floor {kfloor['floor_s'] * 1e3:.0f} ms = {kfloor['sgd_steps']:.0f} SGD "
              "steps (" + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in
                                    kfloor["parts_s"].items()) + ")", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="training steps per timed run")
    ap.add_argument("--tracked", type=int, default=8, help="tracked steps in the tracked run")
    ap.add_argument("--probe", type=int, default=512)
    ap.add_argument("--damping", type=float, default=1e-4)
    ap.add_argument("--fisher", default="exact")
    ap.add_argument("--epochs", type=int, default=15, help="the study's epochs (projection)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epoch1", action="store_true",
                    help="also time the whole first epoch with and without the tracker")
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe-sizes", type=int, nargs="*", default=None,
                    help="time BiasShiftProbe measurements directly for these probe sizes")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe_sizes:
        result = bench_probe(args.probe_sizes, args.reps, args.damping, device)
        result.update({"device": str(device), "threads": args.threads, "torch": torch.__version__,
                       "platform": platform.platform(), "net": "8x128 ELU MLP, batch 64",
                       "damping": "1e-3 relative (probe); old path absolute " f"{args.damping}"})
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        return
    full = mnist_shaped(args.data_dir).to(device)
    sub = full.subset(64 * args.steps, 1000)
    every = max(1, args.steps // args.tracked)
    steps = list(range(every, every * args.tracked + 1, every))

    def tracker(schedule) -> BiasShiftTracker:
        return BiasShiftTracker(probe_size=args.probe, damping=args.damping,
                                fisher=args.fisher, schedule=schedule)

    timed_fit(sub.subset(64 * 20, 100), device, [tracker([1])])  # warm-up
    plain, tracked = [], []
    for _ in range(args.reps):  # interleaved
        plain.append(timed_fit(sub, device, []))
        tracked.append(timed_fit(sub, device, [tracker(steps)]))
    t_step = statistics.median(plain) / args.steps
    t_track = (statistics.median(tracked) - statistics.median(plain)) / len(steps)

    # the trainer's per-epoch evaluation (whole sets + the 10,000-sample probe)
    t = Trainer(lambda: paper_mlp("elu"), full, epochs=1, device=device, probe_size=10_000)
    _sync(device)
    t0 = time.perf_counter()
    t.evaluate()
    t.probe()
    _sync(device)
    t_eval = time.perf_counter() - t0

    spe = math.ceil(full.train_x.shape[0] / 64)
    sched = StepSchedule.log_spaced(8, epoch_ends=True).steps(args.epochs * spe, spe)
    n_tracked = len(sched)
    train = args.epochs * spe * t_step
    ratio_train = (train + n_tracked * t_track) / train
    ratio_epoch = (train + args.epochs * t_eval + n_tracked * t_track) / (
        train + args.epochs * t_eval)
    first = [s for s in sched if s <= spe]
    ratio_first = (spe * t_step + len(first) * t_track) / (spe * t_step)

    result = {
        "device": str(device), "threads": args.threads, "platform": platform.platform(),
        "torch": torch.__version__, "data": full.name, "probe": args.probe,
        "fisher": args.fisher, "damping": args.damping, "reps": args.reps,
        "seconds_per_training_step": t_step,
        "seconds_per_tracked_step": t_track,
        "tracked_step_over_training_step": t_track / t_step,
        "seconds_per_evaluation": t_eval,
        "schedule": f"log-spaced 8 per decade + epoch ends, {args.epochs} epochs x {spe} steps",
        "tracked_steps_in_schedule": n_tracked,
        "tracked_steps_in_epoch_1": len(first),
        "ratio_training_loop_with_tracker": ratio_train,
        "ratio_epoch_incl_evaluation_with_tracker": ratio_epoch,
        "ratio_epoch_1_training_loop": ratio_first,
        "plain_runs_s": plain, "tracked_runs_s": tracked,
    }
    if args.epoch1:
        e_plain, e_tracked = [], []
        for _ in range(max(1, args.reps // 2)):
            e_plain.append(timed_fit(full, device, []))
            e_tracked.append(timed_fit(full, device, [tracker(StepSchedule.log_spaced(8))]))
        result["epoch1_plain_s"] = e_plain
        result["epoch1_tracked_s"] = e_tracked
        result["epoch1_measured_ratio"] = statistics.median(e_tracked) / statistics.median(
            e_plain)

    print(f"8x128 MLP, {full.name}, batch 64, {args.threads} thread(s), {device}")
    print(f"  training step              {t_step * 1e3:9.2f} ms")
    print(f"  tracked step (probe {args.probe})   {t_track * 1e3:9.1f} ms  "
          f"({t_track / t_step:.0f}x a training step)")
    print(f"  evaluation per epoch       {t_eval:9.2f} s")
    print(f"  schedule: {n_tracked} tracked steps in {args.epochs} epochs "
          f"({len(first)} in epoch 1)")
    print(f"  time with / without tracker: training loop {ratio_train:.2f}x, epoch incl. "
          f"evaluation {ratio_epoch:.2f}x, epoch 1 {ratio_first:.2f}x")
    if args.epoch1:
        print(f"  epoch 1 measured: {result['epoch1_measured_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
