"""Cost of the Fig. 3 autoencoder on the CPU: achieved GFLOP/s of one SGD training step against
plain matrix products of the same shapes (issue 14).

One training step of the 784-1000-500-250-30 autoencoder (mirrored decoder, batch 64) does, per
Linear layer ``in -> out``, three products: the forward ``X W^T`` (``2 B in out`` flops), the
gradient of the input ``G W`` (the same; not needed for the first layer, whose input needs no
gradient) and the gradient of the weight ``G^T X`` (the same).  The counted work is therefore
``2 B (3 P - 784 * 1000)`` flops for the ``P`` weights (the issue's "about 17 MFLOP per sample"
is ``6 P``, counting the first layer's input gradient too; both numbers are printed).

The baseline does exactly these products with ``torch.mm`` on tensors of the same shapes and
nothing else (no activations, bias, loss, autograd or optimizer).  The two are timed
interleaved, ``--repeats`` times, and the medians reported: the ratio is what the machine's
noise (other processes on the cores) leaves comparable.  ``--threads`` sets
``torch.set_num_threads``.

    python analyses/bench_autoencoder.py --threads 1 --out figures/bench_autoencoder.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from biasshift.io import provenance, write_json
from biasshift.models import autoencoder
from biasshift.train.reconstruction import reconstruction_loss

ENCODER = (1000, 500, 250, 30)


def layer_shapes(in_features: int = 784, encoder: tuple[int, ...] = ENCODER
                 ) -> list[tuple[int, int]]:
    """``(in, out)`` of every Linear layer of the autoencoder, encoder then decoder."""
    widths = [in_features, *encoder, *encoder[-2::-1], in_features]
    return list(itertools.pairwise(widths))


def step_flops(batch: int, shapes: list[tuple[int, int]]) -> int:
    """Flops of the products of one training step (no input gradient for the first layer)."""
    return sum(2 * batch * i * o * (2 if k == 0 else 3) for k, (i, o) in enumerate(shapes))


def _time(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="steps per timing")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timings of each")
    p.add_argument("--activation", default="elu")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    shapes = layer_shapes()
    flops = step_flops(b, shapes)
    params = sum(i * o for i, o in shapes)

    model = autoencoder(args.activation, output="linear")
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    x = torch.rand(b, 784)

    def train_step() -> None:
        loss = reconstruction_loss(model(x), x, "bce", logits=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ws = [torch.randn(o, i) * i ** -0.5 for i, o in shapes]
    acts = [torch.randn(b, i) for i, _ in shapes]
    grads = [torch.randn(b, o) for _, o in shapes]

    def matmuls() -> None:
        for k, (w, a, g) in enumerate(zip(ws, acts, grads)):
            torch.mm(a, w.t())  # forward
            if k:
                torch.mm(g, w)  # gradient of the input
            torch.mm(g.t(), a)  # gradient of the weight

    step_s, mm_s = [], []
    for _ in range(args.repeats):
        step_s.append(_time(train_step, args.steps))
        mm_s.append(_time(matmuls, args.steps))
    t_step, t_mm = statistics.median(step_s), statistics.median(mm_s)
    res = {
        "batch": b, "threads": args.threads, "activation": args.activation,
        "params_weights": params, "flops_per_step": flops,
        "mflop_per_sample_counted": flops / b / 1e6,
        "mflop_per_sample_6P": 6 * params / 1e6,
        "train_step_s": t_step, "matmul_chain_s": t_mm,
        "train_step_gflops": flops / t_step / 1e9, "matmul_chain_gflops": flops / t_mm / 1e9,
        "ratio_train_over_matmul": (flops / t_step) / (flops / t_mm),
        "train_step_s_all": step_s, "matmul_chain_s_all": mm_s,
        "epoch_s_full_mnist_projected": t_step * (60000 / b),
        "paper_preset_cpu_days_projected": 16 * 500 * t_step * (60000 / b) / 86400,
    }
    print(f"training step (batch {b}, {args.threads} thread(s)): {t_step * 1e3:.1f} ms, "
          f"{res['train_step_gflops']:.1f} GFLOP/s")
    print(f"the same matrix products alone: {t_mm * 1e3:.1f} ms, "
          f"{res['matmul_chain_gflops']:.1f} GFLOP/s")
    print(f"ratio (training step / plain matmuls): {res['ratio_train_over_matmul']:.2f}")
    print(f"counted {res['mflop_per_sample_counted']:.1f} MFLOP per sample "
          f"(6P = {res['mflop_per_sample_6P']:.1f}); projected full-MNIST epoch "
          f"{res['epoch_s_full_mnist_projected']:.0f} s of training steps; the paper preset "
          f"(16 runs x 500 epochs) {res['paper_preset_cpu_days_projected']:.1f} CPU-days")
    if args.out is not None:
        write_json(provenance(benchmark="bench_autoencoder", command=" ".join(sys.argv),
                              **res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
