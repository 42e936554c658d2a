"""Benchmark: UnitNaturalGradient's training step against plain SGD on the paper's 8x128 MLP.

The model is :func:`biasshift.models.paper_mlp` (784-128x8-10, ELU) on random MNIST-shaped data
(batch 64, 1x28x28, 10 classes).  A *training step* is what a user's loop pays: forward,
``zero_grad``, backward (with the optimiser's hooks) and ``step``.  Settings (each its own copy
of the model, same initial weights):

* ``sgd`` — ``torch.optim.SGD(lr)``;
* ``ung defaults`` — ``UnitNaturalGradient(model, lr)``: statistics every 20th step (after a
  20-step warm-up), factors when the EMA has moved or every 200 steps, Cholesky solves;
* ``ung u=U i=I`` — other ``update_every``/``inverse_every``; ``inverse`` the explicit-inverse
  form; ``units-region`` the block-model trust region (no per-step recording, no extra
  forward of each layer: the cost of the default network trust region is the difference);
  ``tpmv`` the defaults with the opt-in CPU apply (two BLAS ``?tpmv`` per unit on the packed
  ``W = L⁻¹`` instead of two ``?trsv`` on the full-storage ``L``,
  :data:`biasshift.optim.block_solve.PACKED_INVERSE`).

Every setting first runs ``--warmup`` steps (past the optimiser's warm-up, so that the timed
steps are the steady state), then the settings run interleaved (round-robin, ``--steps`` steps
each per round, ``--rounds`` rounds), so that machine load hits all of them alike.  Per setting:
the median step time (a typical step: no Fisher update, no refresh) and the mean over all
steps (updates and refreshes amortised), each as a ratio to SGD's.  Then a breakdown of the
default optimiser's work: one EMA update of every layer, one refresh of every layer's factors,
one application of the factors to every layer's gradient; the bytes the factors stream per step;
and the size of a checkpoint of the optimiser's state.  Last, the *hardware floor* of the
default step on this machine (:func:`hardware_floor`): the factors read once at the measured
read bandwidth, the EMA's Grams and the refresh's Cholesky factorisations at ``torch.matmul``'s
rate, amortised over the default schedule, as ratios to the same SGD step.

    python analyses/bench_optim.py                  # CPU, 1 thread (a few minutes)
    python analyses/bench_optim.py --quick          # fewer steps
    python analyses/bench_optim.py --device cuda --out runs/bench_optim_cuda.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from biasshift.models import paper_mlp
from biasshift.optim import UnitNaturalGradient, block_solve
from biasshift.timing import best_of
from biasshift.timing import synchronize as sync

SETTINGS = [
    ("sgd", None),
    ("ung defaults", {}),
    ("ung u=10 i=100", dict(update_every=10, inverse_every=100)),
    ("ung u=1 i=20", dict(update_every=1, inverse_every=20)),
    ("ung inverse", dict(factor="inverse")),
    ("ung units-region", dict(trust_region="units")),
    ("ung tpmv", {}),
]
#: settings whose factors are applied by the opt-in CPU path (two BLAS ?tpmv on the packed
#: W = L⁻¹ instead of two ?trsv on L): an A/B of the apply in the same process
TPMV = ("ung tpmv",)


def build(kw: dict | None, device: torch.device, lr: float):
    torch.manual_seed(0)
    model = paper_mlp("elu").to(device)
    if kw is None:
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return model, UnitNaturalGradient(model, lr=lr, **kw)


def hardware_floor(opt: UnitNaturalGradient, device: torch.device, batch: int, streamed: int,
                   sgd_step_s: float, hp: dict) -> dict:
    r"""What the default step cannot go below on this machine, measured in this process.

    * Applying the factors must read them once per step: ``streamed`` bytes (the Cholesky
      factors' lower triangles) at the machine's read bandwidth, measured as the time of
      ``sum()`` over a contiguous float32 tensor of that size (best of 5; an optimistic bound,
      since a triangular solve also has a dependency chain that a sum does not have).
    * The EMA update is at least the δ²-weighted Grams of the batch, lower triangles only:
      ``units · m(m+1)/2 · batch · 2`` flops per layer (``m`` = inputs + 1); the refresh at least
      one Cholesky per unit, ``units · m³/3`` flops; both at ``torch.matmul``'s float32 rate on
      1024² (the best a GEMM-bound kernel can do here).
    * Amortised with the default schedule: an update every ``update_every`` steps, a refresh at
      most every ``inverse_every`` steps.
    """
    shapes = [tuple(layer.factors.factor.shape) for layer in opt._layers
              if layer.factors is not None]
    big = torch.ones(max(1, streamed // 4), device=device)
    t_read = best_of(lambda: big.sum(), 5, device)
    a = torch.randn(1024, 1024, device=device)
    t_mm = best_of(lambda: a @ a, 5, device)
    rate = 2 * 1024**3 / t_mm
    gram_flops = sum(u * m * (m + 1) / 2 * batch * 2 for u, m, _ in shapes)
    chol_flops = sum(u * m**3 / 3 for u, m, _ in shapes)
    apply_s, update_s, refresh_s = t_read, gram_flops / rate, chol_flops / rate
    typical = sgd_step_s + apply_s
    amortised = typical + update_s / hp["update_every"] + refresh_s / hp["inverse_every"]
    return dict(read_GB_per_s=streamed / t_read / 1e9, matmul_GFLOP_per_s=rate / 1e9,
                apply_floor_s=apply_s, update_floor_s=update_s, refresh_floor_s=refresh_s,
                gram_flops=gram_flops, cholesky_flops=chol_flops, sgd_step_s=sgd_step_s,
                median_floor_ratio=typical / sgd_step_s,
                mean_floor_ratio=amortised / sgd_step_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=25, help="untimed steps per setting first")
    ap.add_argument("--steps", type=int, default=50, help="steps per setting and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 20 steps")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 20, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    n_batches = 8
    xs = torch.rand(n_batches, args.batch, 1, 28, 28, generator=g).to(device)
    ys = torch.randint(0, 10, (n_batches, args.batch), generator=g).to(device)
    runs = {name: build(kw, device, args.lr) for name, kw in SETTINGS}
    times: dict[str, list[float]] = {name: [] for name in runs}
    counters = dict.fromkeys(runs, 0)

    def one_step(name: str) -> float:
        model, opt = runs[name]
        i = counters[name] % n_batches
        counters[name] += 1
        block_solve.PACKED_INVERSE = name in TPMV
        try:
            sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xs[i]), ys[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            return time.perf_counter() - t0
        finally:
            block_solve.PACKED_INVERSE = False

    t_warm = {}
    for name in runs:  # the optimiser's warm-up (statistics every step), kernels, allocation
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            one_step(name)
        t_warm[name] = time.perf_counter() - t0
    for _ in range(args.rounds):
        for name in runs:
            times[name].extend(one_step(name) for _ in range(args.steps))

    base_med = statistics.median(times["sgd"])
    base_mean = statistics.fmean(times["sgd"])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps per setting (interleaved) after "
          f"{args.warmup} warm-up steps")
    print(f"{'setting':16s} {'median ms':>10s} {'x SGD':>7s} {'mean ms':>10s} {'x SGD':>7s} "
          f"{'warm-up s':>10s}")
    results = {}
    for name, ts in times.items():
        med, mean = statistics.median(ts), statistics.fmean(ts)
        results[name] = dict(median_s=med, mean_s=mean, median_ratio=med / base_med,
                             mean_ratio=mean / base_mean, steps=len(ts), warmup_s=t_warm[name])
        print(f"{name:16s} {med * 1e3:10.2f} {med / base_med:7.1f} {mean * 1e3:10.2f} "
              f"{mean / base_mean:7.1f} {t_warm[name]:10.2f}")

    # breakdown of the default optimiser's work
    model, opt = runs["ung defaults"]
    assert isinstance(opt, UnitNaturalGradient)
    for layer in opt._layers:
        layer.running.recording = True
    loss = F.cross_entropy(model(xs[0]), ys[0])
    opt.zero_grad()
    loss.backward()
    sync(device)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    for layer in opt._layers:
        layer.running.update(0.95)
    sync(device)
    t_update = time.perf_counter() - t0
    hp = opt.param_groups[0]
    t0 = time.perf_counter()
    for layer in opt._layers:
        layer.dirty = True
        opt._refresh(layer, hp)
    sync(device)
    t_refresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    for layer in opt._layers:
        opt._natural_direction(layer, {}, {})
    sync(device)
    t_apply = time.perf_counter() - t0
    # the big layers' factors applied by the opt-in path (two ?tpmv on the packed W = L⁻¹)
    t_tpmv = 0.0
    for layer in opt._layers:
        f = layer.factors
        if f is not None and f.form == "cholesky" and block_solve._packs(f.factor):
            W, _ = block_solve._packed_tri_inverse(f.factor)
            g = torch.randn(f.factor.shape[:2])
            m = f.factor.shape[-1]
            t_tpmv += (best_of(lambda W=W, g=g, m=m: block_solve._blas_tpmv(W, g, m), 3, device)
                       - best_of(lambda f=f, g=g: f.apply(g), 3, device))
    t_apply_tpmv = t_apply + t_tpmv
    streamed = sum(f.factor.numel() * f.factor.element_size() // (2 if f.form == "cholesky" else 1)
                   for f in (layer.factors for layer in opt._layers) if f is not None)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    breakdown = dict(update_s=t_update, refresh_s=t_refresh, apply_s=t_apply,
                     apply_tpmv_s=t_apply_tpmv,
                     factor_bytes_streamed_per_step=streamed, checkpoint_bytes=buf.tell())
    floor = hardware_floor(opt, device, args.batch, streamed, base_med, hp)
    print(f"default step breakdown: EMA update of all layers {t_update * 1e3:.1f} ms (every "
          f"{hp['update_every']} steps after the warm-up), refresh of all factors "
          f"{t_refresh * 1e3:.1f} ms (at most every {hp['inverse_every']} steps), factors "
          f"applied {t_apply * 1e3:.1f} ms (every step; streams {streamed / 1e6:.0f} MB of "
          f"factors; {t_apply_tpmv * 1e3:.1f} ms by the opt-in ?tpmv path); SGD step "
          f"(fwd+bwd+step) {base_med * 1e3:.2f} ms")
    print(f"optimizer checkpoint: {buf.tell() / 2**20:.0f} MiB")
    print(f"hardware floor of the default step (same process): read bandwidth "
          f"{floor['read_GB_per_s']:.1f} GB/s, float32 matmul {floor['matmul_GFLOP_per_s']:.0f} "
          f"GFLOP/s -> factors applied >= {floor['apply_floor_s'] * 1e3:.1f} ms per step, EMA "
          f"update >= {floor['update_floor_s'] * 1e3:.1f} ms, refresh >= "
          f"{floor['refresh_floor_s'] * 1e3:.1f} ms; a typical step >= "
          f"{floor['median_floor_ratio']:.1f}x SGD, amortised >= "
          f"{floor['mean_floor_ratio']:.1f}x SGD")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=str(device), threads=torch.get_num_threads(), batch=args.batch,
            rounds=args.rounds, steps=args.steps, warmup=args.warmup, lr=args.lr,
            results=results, breakdown=breakdown, hardware_floor=floor,
            torch=torch.__version__,
        ), indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
