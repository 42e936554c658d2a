"""Per-model-step time of K runs trained as one stacked model (issue 16), against one run.

For the paper's 8x128 MNIST classifier (Fig. 2), the Fig. 3 autoencoder and the conv-activations
preset's net (the 11-layer CIFAR net at 1/8 width on 28x28 inputs, no dropout), at batch 64,
this times training steps of the real code paths on a synthetic MNIST-shaped dataset:

* ``single``: :meth:`Trainer._train_epoch` of one run (``nn.Sequential`` + ``torch.optim.SGD``);
* ``stacked`` (K = 1, 4, 20): :meth:`BatchedTrainer._train_epoch` of K runs, each member with its
  own activation (ELU, ReLU, LReLU, SReLU, a quarter each), seed, data order and lr; its forward and
  backward are batched GEMMs (``baddbmm``/``bmm``) and, for the conv net, grouped convolutions;
* ``vmap`` (K = 4, 20): K members as ``torch.func.vmap`` over ``functional_call`` and ``grad``
  (one activation for all members: vmap maps one function), next to ``stacked_elu``, the stack
  with that one activation, to choose bmm vs vmap like for like;

and reports milliseconds **per model step** (a step of one run: the K-stack's step / K), the
speed-up over ``single``, and GFLOP/s as % of ``torch.matmul``'s rate on 1024² float32 in the
same process (FLOPs: ``2·B·Σ in·out`` forward, twice that backward, less the first layer's
input gradient).

On CUDA (``--device cuda``) ``--capture graph`` records one stacked step (forward, backward,
update) in a CUDA graph and replays it, ``--capture compile`` uses
``torch.compile(mode="reduce-overhead")``; either is first checked to give the same weights as
the eager step after a few steps (``max_rel_diff`` in the JSON).

    python analyses/bench_batched.py                     # CPU, one thread, ~2 min
    python analyses/bench_batched.py --device cuda --capture graph
    python analyses/bench_batched.py --momentum 0.9     # momentum SGD + weight decay 5e-4
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.timing import best_of
from biasshift.timing import synchronize as sync

ACTS = ("elu", "relu", "lrelu", "srelu")


def dataset(n: int, device: str):
    from biasshift.data import ArrayDataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset("synthetic-mnist", x, y, x[:256], y[:256], 10).to(device)


def factory(net: str, act: str) -> nn.Module:
    from biasshift.models import autoencoder, paper_mlp

    if net == "conv":  # the conv-activations preset's net: 11 layers at 1/8 width, 28x28
        from biasshift.models import cifar_conv11

        return cifar_conv11(act, num_classes=10, in_channels=1, width=1 / 8, pooled_stacks=4,
                            dropout=False)
    return paper_mlp(act) if net == "mlp" else autoencoder(act)


def step_flops(model: nn.Module, batch: int) -> float:
    """Forward, input-gradient and weight-gradient FLOPs of one step (the first layer's input
    gradient is not needed): multiply-adds of every Linear and convolution, traced on one
    MNIST-shaped sample."""
    macs: list[float] = []

    def seen(name: str, m: nn.Module, inputs: Any, out: Tensor) -> None:
        if isinstance(m, nn.Linear):
            macs.append(m.in_features * m.out_features)
        else:
            per_out = m.weight[0].numel()  # (in / groups) * kernel
            macs.append(out.numel() * per_out)

    from biasshift.hooks import Trace

    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    with torch.no_grad(), Trace(layers, forward=seen):
        model(torch.zeros(1, 1, 28, 28))
    return 2.0 * batch * (3 * sum(macs) - macs[0])


def matmul_rate(device: torch.device, repeat: int = 5) -> float:
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    best = float("inf")
    for _ in range(repeat + 1):
        sync(device)
        s = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - s)
    return 2.0 * 1024**3 / best / 1e9


def trainers(net: str, K: int, ds: Any, device: str, acts: tuple[str, ...] = ACTS,
             momentum: float = 0.0) -> list:
    """``K`` members; with ``momentum`` their SGD has it and weight decay 5e-4 (as the
    conv-activations protocol trains)."""
    from biasshift.train import Trainer

    loss = "reconstruction" if net == "autoencoder" else "cross_entropy"
    lr = 1e-3 if net == "autoencoder" else 0.01

    def sgd(lr_k: float) -> Any:
        if not momentum:
            return None
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr_k, momentum=momentum,
                                         weight_decay=5e-4)

    # members ordered by activation, as the runner orders the runs of an analysis
    return [Trainer(functools.partial(factory, net, acts[k * len(acts) // K]), ds, loss=loss,
                    lr=lr * (1 + 0.1 * k), seed=k, epochs=1, probe_size=0, device=device,
                    run_name=f"m{k}", optimizer=sgd(lr * (1 + 0.1 * k))) for k in range(K)]


def time_epochs(fn, steps: int, device: torch.device, repeat: int) -> float:
    """Best seconds per step of ``fn()`` (one epoch of ``steps`` steps), after a warm-up."""
    return best_of(fn, repeat, device) / steps


def vmap_step_fn(net: str, K: int, ds: Any, batch: int):
    """K members (one activation) as vmap over functional_call + grad, plain SGD."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [factory(net, "elu").to(ds.train_x.device) for _ in range(K)]
    params, _ = stack_module_state(models)
    base = models[0]
    recon = net == "autoencoder"

    def loss_fn(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(base, p, (x,))
        if recon:
            return (out - x.reshape(x.shape[0], -1)).square().sum() / x.shape[0]
        return F.cross_entropy(out, y)

    g_fn = vmap(grad(loss_fn))
    n = ds.train_x.shape[0]
    perms = torch.stack([torch.randperm(n) for _ in range(K)]).to(ds.train_x.device)

    def epoch() -> None:
        for s in range(0, n, batch):
            idx = perms[:, s:s + batch]
            g = g_fn(params, ds.train_x[idx], ds.train_y[idx])
            with torch.no_grad():
                for k in params:
                    params[k].sub_(g[k], alpha=0.01)

    return epoch


def captured_step(bt: Any, capture: str, steps: int) -> tuple[Any, float]:
    """A CUDA-graph / compiled stacked step on fixed batches; checks it against eager steps.

    Returns ``(step_fn, max_rel_diff)``: ``step_fn()`` runs one captured step on the next
    batch, ``max_rel_diff`` the largest relative weight difference after ``steps`` steps.
    """
    import copy

    stack = bt.stack
    ds = bt.dataset
    K = bt.K
    B = bt.trainers[0].batch_size
    perm = bt.epoch_orders(1).to(ds.train_x.device)
    batches = [perm[:, s * B:(s + 1) * B] for s in range(steps)]
    start = copy.deepcopy(stack.state_dict())

    def eager(idx: Tensor) -> None:
        x = ds.train_x[idx]
        losses = bt._losses(stack(x), x, ds.train_y[idx] if bt.trainers[0].loss ==
                            "cross_entropy" else x)
        stack.zero_grad(set_to_none=False)
        losses.sum().backward()
        bt._sgd_step([True] * K)

    for idx in batches:
        eager(idx)
    ref = {k: v.clone() for k, v in stack.state_dict().items()}
    stack.load_state_dict(start)
    static = batches[0].clone()
    if capture == "graph":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as CUDA graphs require
            saved = copy.deepcopy(stack.state_dict())
            eager(static)
            stack.load_state_dict(saved)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager(static)

        def run(idx: Tensor) -> None:
            static.copy_(idx)
            graph.replay()
    else:
        compiled = torch.compile(eager, mode="reduce-overhead")

        def run(idx: Tensor) -> None:
            static.copy_(idx)
            compiled(static)

    for idx in batches:
        run(idx)
    sync(torch.device(ds.train_x.device))
    diff = max(float((stack.state_dict()[k] - v).abs().max() / v.abs().max().clamp_min(1e-30))
               for k, v in ref.items())
    state = {"i": 0}

    def step() -> None:
        run(batches[state["i"] % len(batches)])
        state["i"] += 1

    return step, diff


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from biasshift.train.batched import BatchedTrainer

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    steps = args.steps
    ds = dataset(steps * args.batch, args.device)
    peak = matmul_rate(device)
    res: dict[str, Any] = dict(device=str(device), threads=args.threads, batch=args.batch,
                               steps=steps, torch=torch.__version__, matmul_gflops=peak,
                               momentum=args.momentum, nets={})
    for net in args.nets.split(","):
        flops = step_flops(factory(net, "elu"), args.batch)
        single = trainers(net, 1, ds, args.device, momentum=args.momentum)[0]
        rows: dict[str, Any] = {}
        t1 = time_epochs(lambda s=single: s._train_epoch(1), steps, device, args.repeat)
        rows["single"] = dict(ms=1e3 * t1, speedup=1.0, pct_peak=100 * flops / t1 / 1e9 / peak)
        for K in ks:
            bt = BatchedTrainer(trainers(net, K, ds, args.device, momentum=args.momentum))
            tk = time_epochs(lambda bt=bt: bt._train_epoch(1, None), steps, device,
                             args.repeat) / K
            rows[f"stacked_K{K}"] = dict(ms=1e3 * tk, speedup=t1 / tk,
                                         pct_peak=100 * flops / tk / 1e9 / peak)
            if K > 1 and args.vmap and not args.momentum:  # vmap rows: plain SGD only
                # like for like: the stack with one activation (ELU) for all members
                bt1 = BatchedTrainer(trainers(net, K, ds, args.device, acts=("elu",)))
                ts = time_epochs(lambda bt1=bt1: bt1._train_epoch(1, None), steps, device,
                                 args.repeat) / K
                rows[f"stacked_elu_K{K}"] = dict(ms=1e3 * ts, speedup=t1 / ts,
                                                 pct_peak=100 * flops / ts / 1e9 / peak)
                fn = vmap_step_fn(net, K, ds, args.batch)
                tv = time_epochs(fn, steps, device, args.repeat) / K
                rows[f"vmap_K{K}"] = dict(ms=1e3 * tv, speedup=t1 / tv,
                                          pct_peak=100 * flops / tv / 1e9 / peak)
            if device.type == "cuda" and args.capture != "none":
                step, diff = captured_step(bt, args.capture, min(steps, 8))
                tc = time_epochs(lambda step=step: [step() for _ in range(steps)], steps,
                                 device, args.repeat) / K
                rows[f"{args.capture}_K{K}"] = dict(ms=1e3 * tc, speedup=t1 / tc,
                                                    pct_peak=100 * flops / tc / 1e9 / peak,
                                                    max_rel_diff=diff)
        res["nets"][net] = dict(gflop_per_step=flops / 1e9, rows=rows)
        for name, r in rows.items():
            extra = f", max rel diff {r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
            print(f"{net:11s} {name:12s} {r['ms']:8.3f} ms/model-step  x{r['speedup']:.2f}  "
                  f"{r['pct_peak']:5.1f}% of matmul ({peak:.0f} GFLOP/s){extra}",
                  file=sys.stderr, flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nets", default="mlp,autoencoder,conv")
    ap.add_argument("--k", default="1,4,20", help="stack sizes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="steps per timed epoch")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="SGD momentum (with weight decay 5e-4) for single and stacked runs")
    ap.add_argument("--no-vmap", dest="vmap", action="store_false")
    ap.add_argument("--capture", choices=("none", "graph", "compile"), default="none",
                    help="CUDA only: capture the stacked step (checked against eager)")
    ap.add_argument("--out", default=None, help="also write the JSON here (with provenance)")
    args = ap.parse_args(argv)
    if args.capture != "none" and not args.device.startswith("cuda"):
        ap.error("--capture needs --device cuda")
    res = bench(args)
    print(json.dumps(res, indent=2))
    if args.out:
        from biasshift.io import provenance, write_json

        write_json({"results": res, "provenance": provenance()}, Path(args.out))
    return res


if __name__ == "__main__":
    main()
