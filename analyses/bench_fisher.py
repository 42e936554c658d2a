"""Benchmark UnitFisher against the per-sample route (torch.func vmap(grad) + outer products).

Cases (batch 128, float32 model, one tracked layer followed by a small classifier head):

* ``linear``: ``Linear(1024, 1024)`` on ``(N, 1024)``;
* ``conv``: ``Conv2d(192, 240, 3)`` on ``(N, 192, S, S)`` (``--spatial``, default 5: ``L = 9``
  positions per sample, ``P = 128·9 = 1152`` (sample, position) pairs, fewer than the 1729 rows
  of a unit block, so the report takes the Woodbury path.  ``--spatial 8`` gives ``P = 4608``
  and the parameter-space (Cholesky) path, whose δ²-weighted Gram matrices cost
  ``units·P·n1²`` ≈ 6.6 TFLOP: minutes on a CPU, well under a second on a GPU).

For each case and method a fresh interpreter, after a warm-up on 4 samples, measures wall time
and peak memory (``ru_maxrss`` above the baseline after data creation and warm-up on CPU;
``torch.cuda.max_memory_allocated`` on CUDA):

* ``biasshift``: ``accumulate`` (forward, backward, capture), then every unit's true block
  (``UnitFisher.blocks``, chunked by ``memory_budget``), then ``report(damping=1e-3)`` (float64)
  without and (``--cond``; default: for the linear case only) with the condition numbers, which
  cost an ``eigvalsh`` per unit;
* ``persample``: ``vmap(grad)`` per-sample gradients of the layer's weight and bias, then the
  outer products per unit in the same chunks.

``natgrad_s`` times a damped natural gradient of every unit: ``UnitFisher.natural_gradient``
(solver chosen per layer: Woodbury when the pairs are fewer than the block rows) against dense
float64 Cholesky solves of the per-sample route's blocks (for conv these are the true blocks,
biasshift's the theorem's pair blocks: the same cost class, not the same matrix).

Both methods reduce every block to a checksum that must agree.  Finally the δ²-weighted Gram
step alone (:func:`biasshift.fisher.blocks.pair_gram`) is timed next to a plain matmul of the same
FLOPs in the same run (the GPU target: ≥ 50 % of the matmul throughput).

    python analyses/bench_fisher.py              # default, < 5 min on 2 CPU cores
    python analyses/bench_fisher.py --quick      # smaller layers, < 1 min
    python analyses/bench_fisher.py --device cuda --out runs/bench_fisher_cuda.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

CASES = {
    "linear": dict(kind="linear", c_in=1024, c_out=1024),
    "conv": dict(kind="conv", c_in=192, c_out=240, k=3),
}
QUICK = {
    "linear": dict(kind="linear", c_in=256, c_out=256),
    "conv": dict(kind="conv", c_in=48, c_out=60, k=3),
}


def build(case: dict, spatial: int, batch: int, device: torch.device):
    torch.manual_seed(0)
    if case["kind"] == "linear":
        model = nn.Sequential(nn.Linear(case["c_in"], case["c_out"]), nn.ELU(),
                              nn.Linear(case["c_out"], 10))
        x = torch.randn(batch, case["c_in"])
    else:
        model = nn.Sequential(nn.Conv2d(case["c_in"], case["c_out"], case["k"]), nn.ELU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(case["c_out"], 10))
        x = torch.randn(batch, case["c_in"], spatial, spatial)
    y = torch.randint(0, 10, (batch,))
    return model.to(device), x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory above a baseline: ru_maxrss (CPU) or max_memory_allocated (CUDA), in MB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**20


def chunk_size(units: int, n1: int, budget: int, itemsize: int = 4) -> int:
    from biasshift.fisher.blocks import chunk_units

    return chunk_units(units, 3 * n1 * n1 * itemsize, budget // 2)


def worker(args: argparse.Namespace) -> dict:
    from biasshift import UnitFisher

    device = torch.device(args.device)
    case = (QUICK if args.quick else CASES)[args.case]
    model, x, y = build(case, args.spatial, args.batch, device)
    layer = model[0]
    units = case["c_out"]
    n1 = layer.weight[0].numel() + 1
    B = chunk_size(units, n1, args.memory_budget)
    out: dict[str, object] = dict(case=args.case, method=args.method, units=units, n1=n1,
                                  chunk_units=B)
    if args.method == "biasshift":  # warm-up (lazy initialisation, kernels) on 4 samples
        w = UnitFisher(model, layers=["0"], memory_budget=args.memory_budget)
        w.accumulate(x[:4], y[:4])
        next(iter(w.blocks("0")))
        w.report(damping=1e-3, condition=False)
        del w
    sync(device)
    peak = Peak(device)
    t0 = time.perf_counter()
    checksum = torch.zeros((), dtype=torch.float64, device=device)
    if args.method == "biasshift":
        uf = UnitFisher(model, layers=["0"], memory_budget=args.memory_budget)
        uf.accumulate(x, y)
        sync(device)
        t1 = time.perf_counter()
        for _sl, blk in uf.blocks("0", positions="sum"):
            checksum += blk.double().square().sum()
        sync(device)
        t2 = time.perf_counter()
        out.update(accumulate_s=t1 - t0, matrix_s=t2 - t1, total_matrix_s=t2 - t0,
                   peak_matrix_mb=peak.mb(), n_pairs=uf.moments("0").n_pairs)
        t3 = time.perf_counter()
        uf.natural_gradient("0", damping=1e-3)
        sync(device)
        out.update(natgrad_s=time.perf_counter() - t3)
        t3 = time.perf_counter()
        df = uf.report(damping=1e-3, condition=False)
        sync(device)
        t4 = time.perf_counter()
        out.update(report_nocond_s=t4 - t3, solver=str(df.solver.iloc[0]))
        if args.cond == "all":
            df = uf.report(damping=1e-3)
            sync(device)
            out.update(report_s=time.perf_counter() - t4,
                       median_cond=float(df.cond_F.median()))
        out.update(median_k=float(df.k.median()), peak_mb=peak.mb())
    else:
        from torch.func import functional_call, grad, vmap

        frozen = {k: v.detach() for k, v in model.named_parameters() if not k.startswith("0.")}
        mine = {k: v.detach() for k, v in model.named_parameters() if k.startswith("0.")}

        def ll(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            o = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))[0]
            return torch.log_softmax(o, -1).gather(0, yi.reshape(1))[0]

        g = vmap(grad(ll), in_dims=(None, 0, 0))(mine, x[:4], y[:4])  # warm-up
        del g
        sync(device)
        peak = Peak(device)
        t0 = time.perf_counter()
        g = vmap(grad(ll), in_dims=(None, 0, 0))(mine, x, y)
        N = x.shape[0]
        G = torch.cat([g["0.bias"].unsqueeze(-1), g["0.weight"].reshape(N, units, -1)], -1)
        del g
        sync(device)
        t1 = time.perf_counter()
        for u0 in range(0, units, B):
            Gc = G[:, u0:u0 + B].transpose(0, 1)  # (B, N, n1)
            blk = torch.matmul(Gc.mT, Gc) / N
            checksum += blk.double().square().sum()
        sync(device)
        t2 = time.perf_counter()
        out.update(per_sample_grads_s=t1 - t0, outer_s=t2 - t1, total_matrix_s=t2 - t0,
                   peak_matrix_mb=peak.mb())
        # natural gradient of the mean NLL for every unit: dense damped Cholesky per block
        gbar = -G.mean(0).double()
        for u0 in range(0, units, B):
            Gc = G[:, u0:u0 + B].transpose(0, 1)
            blk = (torch.matmul(Gc.mT, Gc) / N).double()
            blk.diagonal(dim1=-2, dim2=-1).add_(1e-3)
            L = torch.linalg.cholesky(blk)
            torch.cholesky_solve(gbar[u0:u0 + B].unsqueeze(-1), L)
        sync(device)
        out.update(natgrad_s=time.perf_counter() - t2, peak_mb=peak.mb())
    out["checksum"] = float(checksum)
    return out


def gram_benchmark(case: dict, spatial: int, batch: int, device: torch.device,
                   budget: int) -> dict:
    """The δ²-weighted Gram step alone vs a plain matmul of the same FLOPs (float32)."""
    from biasshift.fisher.blocks import Source, pair_gram

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    n1 = (case["c_in"] * case.get("k", 1) ** 2) + 1
    L = 1 if case["kind"] == "linear" else (spatial - case["k"] + 1) ** 2
    M = batch * L
    units = case["c_out"]
    B = chunk_size(units, n1, budget)
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(M, 1, 1, n1, device=device, generator=g)
    D = torch.randn(M, 1, 1, B, device=device, generator=g)
    flops = 2.0 * B * M * n1 * n1
    A = torch.randn(B * n1, M, device=device, generator=g)
    Y = torch.randn(M, n1, device=device, generator=g)

    def best(fn, repeat: int = 3) -> float:
        fn()
        t = float("inf")
        for _ in range(repeat):
            sync(device)
            s = time.perf_counter()
            fn()
            sync(device)
            t = min(t, time.perf_counter() - s)
        return t

    t_gram = best(lambda: pair_gram([Source(X, D)], 0, slice(None), dtype=torch.float32,
                                    budget=budget // 2))
    t_mm = best(lambda: A @ Y)
    return dict(rows=M, n1=n1, units_per_chunk=B, gflop=flops / 1e9,
                gram_gflops=flops / t_gram / 1e9, matmul_gflops=flops / t_mm / 1e9,
                ratio=t_mm / t_gram)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--spatial", type=int, default=5, help="conv input height = width")
    ap.add_argument("--memory-budget", type=int, default=2**30, help="bytes per chunk")
    ap.add_argument("--quick", action="store_true", help="smaller layers (< 1 min)")
    ap.add_argument("--cond", choices=("auto", "all", "none"), default="auto",
                    help="time the report with condition numbers (eigvalsh per unit): auto = "
                         "for the linear case only")
    ap.add_argument("--cases", default="linear,conv")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.case, args.method = args.worker
        print(json.dumps(worker(args)))
        return
    device = torch.device(args.device)
    start = time.perf_counter()
    results: dict[str, object] = dict(device=str(device), batch=args.batch,
                                      spatial=args.spatial, quick=args.quick,
                                      memory_budget=args.memory_budget,
                                      threads=torch.get_num_threads(), torch=torch.__version__)
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for name in args.cases.split(","):
        runs = {}
        for method in ("biasshift", "persample"):
            cmd = [sys.executable, __file__, "--worker", name, method, "--device", args.device,
                   "--batch", str(args.batch), "--spatial", str(args.spatial),
                   "--memory-budget", str(args.memory_budget)]
            cmd += ["--quick"] if args.quick else []
            if args.cond == "all" or (args.cond == "auto" and name == "linear"):
                cmd += ["--cond", "all"]
            else:
                cmd += ["--cond", "none"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}/{method} failed:\n{proc.stderr}")
            runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        b, p = runs["biasshift"], runs["persample"]
        rel = abs(b["checksum"] - p["checksum"]) / abs(p["checksum"])
        case = (QUICK if args.quick else CASES)[name]
        results[name] = dict(
            biasshift=b, persample=p, checksum_rel_diff=rel,
            time_ratio_persample_over_biasshift=p["total_matrix_s"] / b["total_matrix_s"],
            natgrad_ratio_persample_over_biasshift=p["natgrad_s"] / b["natgrad_s"],
            peak_ratio_persample_over_biasshift=p["peak_matrix_mb"] / max(b["peak_matrix_mb"], 1),
            gram=gram_benchmark(case, args.spatial, args.batch, device, args.memory_budget),
        )
        print(f"[{name}] biasshift accumulate+all blocks {b['total_matrix_s']:.2f} s "
              f"(peak {b['peak_matrix_mb']:.0f} MB), report {b.get('report_s', float('nan')):.2f}"
              f" s ({b['solver']}; {b['report_nocond_s']:.2f} s without cond), natgrad "
              f"{b['natgrad_s']:.2f} s | per-sample {p['total_matrix_s']:.2f} s (peak "
              f"{p['peak_matrix_mb']:.0f} MB), natgrad {p['natgrad_s']:.2f} s | ratio "
              f"{results[name]['time_ratio_persample_over_biasshift']:.2f}x | checksum diff "
              f"{rel:.1e} | gram {results[name]['gram']['gram_gflops']:.0f} GFLOP/s vs matmul "
              f"{results[name]['gram']['matmul_gflops']:.0f} GFLOP/s", file=sys.stderr)
    results["wall_s"] = time.perf_counter() - start
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from biasshift.io import provenance, write_json

        write_json({"results": results, "provenance": provenance()}, Path(args.out))


if __name__ == "__main__":
    main()
