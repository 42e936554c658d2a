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
import copy
import json
import math
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


# ------------------------------------------------------------------------------ GEMM table
TABLE_CASES = {
    "linear784": dict(kind="linear", c_in=784, c_out=128, batch=64),
    "linear512": dict(kind="linear", c_in=512, c_out=512, batch=256),
    "conv64": dict(kind="conv", c_in=64, c_out=64, k=3, spatial=16, batch=32),
}


def stub_nvtx() -> None:
    """ASDL calls ``torch.cuda.nvtx.range_push/range_pop``, which raise on CPU builds."""
    torch.cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]


def table_model(case: dict, dtype: torch.dtype):
    torch.manual_seed(0)
    if case["kind"] == "linear":
        model = nn.Sequential(nn.Linear(case["c_in"], case["c_out"]), nn.ELU(),
                              nn.Linear(case["c_out"], 10))
        x = torch.randn(case["batch"], case["c_in"])
    else:
        s = case["spatial"]
        # AvgPool2d over the whole map (BackPACK's SqrtGGNExact has no AdaptiveAvgPool2d)
        model = nn.Sequential(nn.Conv2d(case["c_in"], case["c_out"], case["k"], padding=1),
                              nn.ELU(), nn.AvgPool2d(s), nn.Flatten(),
                              nn.Linear(case["c_out"], 10))
        x = torch.randn(case["batch"], case["c_in"], s, s)
    y = torch.randint(0, 10, (case["batch"],))
    return model.to(dtype), x.to(dtype), y


def _timed(fn, repeat: int) -> float:
    fn()
    t = float("inf")
    for _ in range(repeat):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def hand_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str):
    """A forward hook on the first layer, the δ of ``ln p`` by autograd (one vector for the
    empirical Fisher, one per class ``√p_c (e_c − p)`` for the exact one): ``(a, D (R, ...))``."""
    import torch.nn.functional as Fn

    got: dict[str, torch.Tensor] = {}
    h = model[0].register_forward_hook(lambda _m, i, o: got.update(a=i[0].detach(), o=o))
    logits = model(x)
    h.remove()
    p = logits.detach().softmax(-1)
    if fisher == "empirical":
        vs = [Fn.one_hot(y, 10).to(p.dtype) - p]
    else:
        eye = torch.eye(10, dtype=p.dtype)
        vs = [p[:, c:c + 1].sqrt() * (eye[c] - p) for c in range(10)]
    D = torch.stack([torch.autograd.grad(logits, got["o"], v, retain_graph=True)[0] for v in vs])
    return got["a"], D


def hand_gram(layer: nn.Module, a: torch.Tensor, D: torch.Tensor, out: torch.Tensor) -> None:
    """The unit blocks by hand: ``Sᵀ S`` with ``S = diag(√(Σ_r δ_r²/N)) [1, a]`` (Linear), or
    ``Gᵀ G`` with the per-sample position-summed gradients ``G = δ @ [1, patches]`` (conv):
    one batched GEMM into ``out``."""
    import torch.nn.functional as Fn

    N = a.shape[0]
    if isinstance(layer, nn.Linear):
        A = torch.cat([torch.ones(N, 1, dtype=a.dtype), a], 1)
        s = (D.square().sum(0) / N).sqrt().T  # (U, N)
        S = A.unsqueeze(0) * s.unsqueeze(-1)
        torch.bmm(S.mT, S, out=out)
        return
    cols = Fn.unfold(a, layer.kernel_size, padding=layer.padding)  # (N, n, L)
    A = torch.cat([torch.ones(N, 1, cols.shape[-1], dtype=a.dtype), cols], 1).mT  # (N, L, n1)
    R, _, U = D.shape[:3]
    Dv = (D / math.sqrt(N)).permute(1, 0, 2, 3, 4).reshape(N, R * U, -1)
    G = torch.bmm(Dv, A).reshape(N, R, U, -1).permute(2, 0, 1, 3).reshape(U, N * R, -1)
    torch.bmm(G.mT, G, out=out)


def block_flops(case: dict, fisher: str) -> float:
    """FLOPs of the blocks: ``2·U·rows·n1²`` (+ the per-sample gradients of a conv layer)."""
    N, U = case["batch"], case["c_out"]
    if case["kind"] == "linear":
        n1 = case["c_in"] + 1
        return 2.0 * U * N * n1 * n1
    n1 = case["c_in"] * case["k"] ** 2 + 1
    L = case["spatial"] ** 2
    R = 1 if fisher == "empirical" else 10
    return 2.0 * N * R * U * L * n1 + 2.0 * U * N * R * n1 * n1


def peer_asdl(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str) -> None:
    import asdl
    import torch.nn.functional as Fn

    cfg = asdl.FisherConfig(fisher_type="fisher_emp" if fisher == "empirical" else
                            "fisher_exact", fisher_shapes=["unit_wise"], loss_type="cross_entropy",
                            data_size=x.shape[0], ignore_modules=[model[-1]])
    fm = asdl.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, x)
    fm.setup_loss_call(Fn.cross_entropy, dummy, y, reduction="sum")
    fm.forward_and_backward()


def peer_backpack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str) -> None:
    """BackPACK's per-sample gradients (``BatchGrad``, empirical) or symmetric factors of the
    exact GGN (``SqrtGGNExact``, = the exact Fisher here), then one batched Gram per unit."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact

    m = extend(model)
    lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
    loss = lossf(m(x), y)
    layer = m[0]
    ext = BatchGrad() if fisher == "empirical" else SqrtGGNExact()
    with backpack(ext):
        loss.backward()
    if fisher == "empirical":
        gw, gb = layer.weight.grad_batch, layer.bias.grad_batch
    else:
        gw, gb = layer.weight.sqrt_ggn_exact, layer.bias.sqrt_ggn_exact
        gw, gb = gw.flatten(0, 1), gb.flatten(0, 1)
    rows = gw.shape[0]
    G = torch.cat([gb.unsqueeze(-1), gw.reshape(rows, gw.shape[1], -1)], -1).transpose(0, 1)
    torch.bmm(G.mT, G) / x.shape[0]
    model.zero_grad(set_to_none=True)


def peer_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str) -> None:
    """torch.func: ``vmap(grad)`` per-sample gradients (per class for the exact Fisher), then
    one batched Gram per unit."""
    from torch.func import functional_call, grad, vmap

    frozen = {k: v.detach() for k, v in model.named_parameters() if not k.startswith("0.")}
    mine = {k: v.detach() for k, v in model.named_parameters() if k.startswith("0.")}

    def ll(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        o = functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),))[0]
        return torch.log_softmax(o, -1).gather(0, yi.reshape(1))[0]

    N = x.shape[0]
    if fisher == "empirical":
        g = vmap(grad(ll), in_dims=(None, 0, 0))(mine, x, y)
        G = torch.cat([g["0.bias"].unsqueeze(-1),
                       g["0.weight"].reshape(N, g["0.bias"].shape[1], -1)], -1)
    else:
        with torch.no_grad():
            p = model(x).softmax(-1)
        parts = []
        for c in range(10):
            yc = torch.full_like(y, c)
            g = vmap(grad(ll), in_dims=(None, 0, 0))(mine, x, yc)
            w = p[:, c].sqrt()
            gc = torch.cat([g["0.bias"].unsqueeze(-1),
                            g["0.weight"].reshape(N, g["0.bias"].shape[1], -1)], -1)
            parts.append(gc * w[:, None, None])
        G = torch.cat(parts)
    G = G.transpose(0, 1)
    torch.bmm(G.mT, G) / N


def matmul_rate(dtype: torch.dtype, repeat: int) -> float:
    """torch.matmul's GFLOP/s on 1024² × 1024² (the machine's GEMM rate)."""
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    return 2.0 * 1024**3 / _timed(lambda: a @ b, repeat) / 1e9


def woodbury_setup(store, damping: float):
    """What :func:`biasshift.fisher.report.layer_quantities` builds before a Woodbury solve."""
    from biasshift.fisher.blocks import WoodburySolver

    X = store.pair_X(0, store.dtype)
    Xa = X[:, 1:]
    K = Xa @ Xa.T
    w = store.pair_w(slice(None), store.dtype)
    return WoodburySolver(Xa, K, (w / store.n_pairs).sqrt(), damping)


def hand_woodbury(Xa: torch.Tensor, w: torch.Tensor, damping: float):
    K = Xa @ Xa.T
    d = (w / Xa.shape[0]).sqrt()
    C = K * (d.unsqueeze(-1) * d.unsqueeze(-2))
    C.diagonal(dim1=-2, dim2=-1).add_(damping)
    return torch.linalg.cholesky_ex(C)


def table_row(name: str, dtype: torch.dtype, fisher: str, peers: list[str],
              repeat: int, args_peer_budget: int = 2**31) -> dict:
    from biasshift import UnitFisher
    from biasshift.fisher.blocks import pair_gram, true_gram

    case = TABLE_CASES[name]
    model, x, y = table_model(case, dtype)
    layer = model[0]
    U, n1 = case["c_out"], layer.weight[0].numel() + 1
    flops = block_flops(case, fisher)
    out = torch.empty(U, n1, n1, dtype=dtype)
    # every peer gets a pristine copy: ASDL and BackPACK leave hooks of different kinds behind
    copies = {p: copy.deepcopy(model) for p in peers}
    row: dict[str, object] = dict(case=name, dtype=str(dtype).replace("torch.", ""),
                                  fisher=fisher, units=U, n1=n1, gflop=flops / 1e9)

    def ours_acc():
        uf = UnitFisher(model, layers=["0"], fisher=fisher)
        uf.accumulate(x, y)
        return uf

    uf = ours_acc()
    a, D = hand_factors(model, x, y, fisher)
    st = uf._stores["0"]
    gram = true_gram if st.multi else pair_gram
    t = {
        "matrix": _timed(lambda: uf.matrix("0", out=out), repeat),
        "matrix_new": _timed(lambda: uf.matrix("0"), repeat),
        "gram": _timed(lambda: gram(st.sources, 0, slice(None), dtype=dtype, budget=2**29,
                                    out=out, scale=1.0 / x.shape[0]), repeat),
        "hand": _timed(lambda: hand_gram(layer, a, D, out), repeat),
        "hand_new": _timed(lambda: hand_gram(layer, a, D, torch.empty_like(out)), repeat),
        "accumulate": _timed(ours_acc, repeat),
        "hand_factors": _timed(lambda: hand_factors(model, x, y, fisher), repeat),
    }
    torch.testing.assert_close(uf.matrix("0"), out, rtol=1e-4 if dtype == torch.float32 else
                               1e-10, atol=1e-6 if dtype == torch.float32 else 1e-12)
    if case["kind"] == "linear" and x.shape[0] < n1:
        Xa = st.pair_X(0, dtype)[:, 1:]
        w = st.pair_w(slice(None), dtype)
        t["woodbury"] = _timed(lambda: woodbury_setup(st, 1e-3), repeat)
        t["hand_woodbury"] = _timed(lambda: hand_woodbury(Xa, w, 1e-3), repeat)
    item = torch.finfo(dtype).bits // 8
    R = 1 if fisher == "empirical" else 10
    for peer in peers:
        fn = {"asdl": peer_asdl, "backpack": peer_backpack, "torch.func": peer_func}[peer]
        # the peers hold per-sample (per-class) gradients, ASDL the per-sample outer products
        # of a Linear layer's inputs: skip a peer whose working set would not fit
        need = 3 * R * x.shape[0] * U * n1 * item
        if peer == "asdl" and case["kind"] == "linear":  # one class at a time
            need = max(need // R, 2 * x.shape[0] * n1 * n1 * item)
        if need > args_peer_budget:
            row[f"{peer}_error"] = f"skipped: needs about {need / 2**30:.1f} GiB"
            continue
        try:
            t[peer] = _timed(lambda fn=fn, m=copies[peer]: fn(m, x, y, fisher),
                             max(1, repeat - 1))
        except Exception as err:  # a peer without this case: named in the table
            row[f"{peer}_error"] = f"{type(err).__name__}: {err}"[:120]
    row.update({f"{k}_s": v for k, v in t.items()})
    total = t["accumulate"] + t["matrix"]
    row.update(
        matrix_gflops=flops / t["matrix"] / 1e9,
        hand_gflops=flops / t["hand"] / 1e9,
        ratio_matrix_over_hand=t["matrix"] / t["hand"],
        ratio_matrix_new_over_hand_new=t["matrix_new"] / t["hand_new"],
        ratio_gram_over_hand=t["gram"] / t["hand"],
        ratio_total_over_hand_total=total / (t["hand_factors"] + t["hand"]),
    )
    if "woodbury" in t:
        row["ratio_woodbury_over_hand"] = t["woodbury"] / t["hand_woodbury"]
    for peer in peers:
        if peer in t:
            row[f"{peer}_gflops"] = flops / t[peer] / 1e9
            row[f"{peer}_over_ours_total"] = t[peer] / total
    return row


def gemm_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    peers = [p for p in args.peers.split(",") if p]
    if "asdl" in peers:
        stub_nvtx()
    rows = []
    rates = {}
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        rates[dt_name] = matmul_rate(dtype, args.repeat)
        for name in args.table_cases.split(","):
            for fisher in args.kinds.split(","):
                row = table_row(name, dtype, fisher, peers, args.repeat,
                                args.peer_budget)
                row["matmul_gflops"] = rates[dt_name]
                row["matrix_pct_of_matmul"] = 100 * row["matrix_gflops"] / rates[dt_name]
                rows.append(row)
                peer_txt = " ".join(f"{p} {row[f'{p}_gflops']:.1f}" for p in peers
                                    if f"{p}_gflops" in row)
                wood = row.get("ratio_woodbury_over_hand")
                print(f"{name:10s} {dt_name:7s} {fisher:9s} matrix {row['matrix_gflops']:6.1f} "
                      f"GFLOP/s ({row['matrix_pct_of_matmul']:4.0f}% of matmul "
                      f"{rates[dt_name]:.0f}) | hand {row['hand_gflops']:6.1f} | matrix/hand "
                      f"{row['ratio_matrix_over_hand']:.2f} (new output "
                      f"{row['ratio_matrix_new_over_hand_new']:.2f}), pair/true_gram/hand "
                      f"{row['ratio_gram_over_hand']:.2f}, total/hand "
                      f"{row['ratio_total_over_hand_total']:.2f}"
                      + (f", woodbury/hand {wood:.2f}" if wood is not None else "")
                      + (f" | GFLOP/s {peer_txt}" if peer_txt else ""), file=sys.stderr,
                      flush=True)
    res = dict(rows=rows, threads=args.threads, torch=torch.__version__,
               matmul_gflops=rates)
    print(json.dumps(res, indent=2))
    if args.out:
        import pandas as pd

        from biasshift.io import provenance, write_csv, write_json

        write_json({"results": res, "provenance": provenance()}, Path(args.out))
        write_csv(pd.DataFrame(rows), Path(args.out).with_suffix(".csv"))


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
    ap.add_argument("--table", action="store_true",
                    help="the GEMM table: matrix()/pair_gram/Woodbury setup against a hand-written "
                         "batched GEMM, torch.matmul's rate and the peers (one process)")
    ap.add_argument("--table-cases", default=",".join(TABLE_CASES))
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--kinds", default="empirical,exact")
    ap.add_argument("--peers", default="asdl,backpack,torch.func",
                    help="comma-separated peers for --table ('' for none)")
    ap.add_argument("--repeat", type=int, default=3, help="--table: best of this many")
    ap.add_argument("--peer-budget", type=int, default=2**31,
                    help="--table: bytes a peer's working set may take (larger: skipped)")
    ap.add_argument("--threads", type=int, default=1, help="--table: torch threads")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        gemm_table(args)
        return
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
