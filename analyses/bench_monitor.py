"""Benchmark: the training-step overhead of :class:`biasshift.ActivationMonitor`.

Models (random data of the stated shapes, plain SGD, cross-entropy, batch 64):

* ``mlp``: the paper's MNIST classifier, ``paper_mlp("elu")``: 8 hidden layers of 128 ELUs
  (8 monitored modules, (64, 128) outputs);
* ``conv``: a small conv net on 32x32x3 inputs: ``Conv(3→32)-ELU-Conv(32→32)-ELU-MaxPool-
  Conv(32→64)-ELU-GAP-Linear`` (3 monitored modules, channels are units).

Arms, measured in the same process and interleaved round by round (A/B/C, C/B/A, ...) after a
warm-up, statistics updated at every step:

* ``off``: no monitor attached;
* ``monitor``: ``ActivationMonitor(model)`` with its defaults (small outputs staged in a 4 MiB
  buffer per module, reduced when full; outputs of at least 2**18 elements reduced at once);
* ``fastai``: a fastai-style ``ActivationStats`` hook: per-*layer* mean and std of every output,
  appended to a list with ``.item()``;
* ``naive``: the obvious per-unit hook: running per-unit sums, sums of squares, min, max,
  negative and zero counts, one reduction each, no shift, no NaN/Inf handling, no staging;
* ``hist`` (default on, ``--no-hist``): the default monitor plus 64-bin histograms (its
  extra cost over ``monitor`` is the histograms' cost);
* ``direct`` (``--direct``): ``ActivationMonitor(model, buffer_bytes=0)``;
* ``noop`` (``--noop``): an empty forward hook on the same modules (the floor: the cost of
  having a hook at all).

Each measurement times a block of ``--block`` steps (``torch.cuda.synchronize`` around the
block only, never inside the monitor); on the CPU with one thread the clock is the process's
CPU time by default, which other processes on a shared machine disturb far less than wall time
(with more threads it would count OpenMP spin-waits, so wall time is used). The table reports
per-step median and mean times and their ratios to ``off``: the median is the typical step, the
mean includes the occasional step that reduces a full buffer, i.e. the amortised cost; "paired"
is the median over rounds of each round's ratio of medians (robust to slow drifts of the
machine's speed). GPU targets: overhead ≤ 10 % (mlp) and ≤ 3 % (conv).

    python analyses/bench_monitor.py                      # CPU, one thread, a few minutes
    python analyses/bench_monitor.py --device cuda --json runs/bench_monitor_cuda.json

Where the time goes (torch.profiler and per-kernel CPU timings, CPU, one thread, torch 2.13,
on a shared 2-core AMD EPYC VM):

* conv net (off: ~142 ms per step): the monitor reduces 5M activations per step (two 2M and
  one 1M conv outputs) in 2**18-element tiles; a tile costs ~700 us (~2.7 ns per element)
  in 15 elementwise kernels, each a full pass at cache bandwidth (~0.15 ns per element):
  the two ``nan_to_num`` fills ~30 % (the first one also pulls the activation from memory,
  2x the second), ``sign_``/``abs_`` and the three sign sums ~28 %, the moments (``sub``,
  ``nan_to_num_``, ``mul_``, two sums) ~27 %, ``amin``/``amax`` ~12 %. Per reduction ~70
  small bookkeeping kernels (tile shifts, ``stack``, the Chan merges) at ~5 us each add
  ~0.5 ms; staging the 1M-element output copied it once more (~1 ms per step; such batches
  are now reduced directly); Python in the hook is negligible here.
* MLP (off: ~2.9 ms per step, 8 hooks on (64, 128) outputs): an empty hook alone costs
  ~3 %; the staging copy ~5 % (it streams into 32 MiB of buffers, cold in cache, and evicts
  the step's own data), Python in the hook ~5 us per call (~1.5 %), and the amortised
  reduction of the 65K staged elements per step ~6 % (same 2.7 ns per element).
* finite first (the CPU's default): a tile of finite values is reduced in 10 passes
  (``amin``/``amax``/``sign`` on the data, no ``nan_to_num`` fills, no masking) and checked by
  one read of its sums; measured on 2048x128 tiles 1.7 ns per element against 2.5 for the
  masked kernels, and the MLP's monitor arm 1.21x -> 1.16x (A/B in one process, load 2-3).
  Of a 4 MiB buffer's reduction (3.7 ms incl. its 128 staging copies) the passes are ~2.1 ms,
  the staging copies ~0.8 ms, ~100 small bookkeeping kernels ~0.6 ms. A forward pass of the
  MLP alone: off 0.92 ms, empty hooks +0.04, the staging copies +0.21 (a 32 KB copy costs
  ~26 us in the forward against ~4 us alone: its destination is cold and it evicts the
  layer's weights from L2), the monitor's Python +0.04, the amortised reductions +0.26.
* histograms: ~1.5 ms per 2**18-element tile before this change (nine float64 passes 56 %,
  the float64 -> int64 index conversion 17 %, ``bincount`` 27 %); the slots are now finished
  in float32 and counted with int32 indices (~20 % less).
* first touch (2026-12-03): the first pass over a staging buffer faults its pages in. With
  the old 5 warm-up steps the first 128 timed MLP steps of the default arm (4 MiB per
  module, 8192 rows of 128 units = 128 batches) paid it, which put its amortised ratio at
  1.32x; with every buffer filled once in the warm-up (the default now) 1.17x, in the same
  session. A long run pays it once. Sweep of ``--buffer-bytes`` (MLP, 40 rounds, one
  process; median / mean ratio to off): 256 KiB 1.16/1.44, 512 KiB 1.12/1.30, 1 MiB
  1.11/1.23, 2 MiB 1.08/1.18, 4 MiB (default) 1.08/1.17, 8 MiB 1.09/1.14: smaller buffers
  reduce more often and each reduction's ~60 small bookkeeping kernels (tile states, Chan
  merges, the finite check) dominate; larger ones save little more and cost memory per
  module, so the default stays 4 MiB.
* histograms (2026-12-03, a 2M-element conv output, one reduction): 2.9 ms without, 6.7 ms
  with 64 dyadic bins; ``bincount`` is ~30 % of the total (and runs its own min and max
  passes over the indices), the five float32 passes of the slots ~15 %. Alternatives timed
  per 2^18 elements against ``bincount`` on int32 indices (124 us): int64 indices 215 us,
  ``index_add_`` 183 us, float ``scatter_add_`` 127 us, ``histc`` 911 us, ``bucketize`` over
  the 65 edges instead of the float passes 6.6 ms, numpy's ``bincount`` 313 us.
* MLP ablation (2026-12-03, default 4 MiB buffers, arms in one process, CPU clock; off
  1.21 ms per step): the monitor added ~190 us per step on average, of which the hooks
  with their Python but no copy ~53 us (an empty hook alone: the module's hook path
  ~2.8 us per call; ``torch.compiler.disable``'s wrapper ~0.5 us per call, now entered only
  under dynamo), the staging copies ~35 us and the amortised reductions ~106 us: a 4 MiB
  buffer (1M elements) takes ~1.7 ms inside a training step against 1.05 ms alone (0.8 ms
  of it the ten finite-first passes, ~0.2 ms ~150 small bookkeeping kernels). Reducing a
  buffer evicts the step's weights, so its cost in a step is ~1.6x its cost alone at every
  buffer size (512 KiB, 1 MiB, 4 MiB), and smaller buffers pay the bookkeeping more often.
  Histograms on the conv net: a 2**18-element tile costs ~210 us alone (``bincount`` on
  int32 ~125 us of it, of which ~38 us its own min/max passes; clamp, mul, floor, the unit
  offsets and the int32 conversion ~85 us); tiles of 2**15-2**19 elements were not faster,
  nor was binning each tile right after its statistics (while cached) instead of after the
  whole batch (A/B in one process: 0.985x and 1.002x). Indices are now int16 below 2**15
  slots (``bincount`` 92 against 110 us, the conversion 16 against 21 us per 2**18): the
  conv outputs' statistics with histograms took 0.955-0.966x the time in three A/B runs.
* tried and rejected: a ``torch.compile``d fused reduction (inductor, CPU) took 10-36 s to
  compile per shape and 210-450 us per tile, no faster than the eager kernels; ``aminmax``
  is ~30x slower than ``amin`` + ``amax`` for dim reductions on the CPU; comparisons and sums
  in bool/int8/half are 2-5x slower than in float32; ``vector_norm``, ``var_mean`` and
  ``heaviside`` are 10-60x slower than the kernels they would replace; stacking the work
  tensors to save kernel launches cost more in cache traffic than it saved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from biasshift import ActivationMonitor
from biasshift.activations import ELU
from biasshift.models import paper_mlp
from biasshift.timing import synchronize as sync

BATCH = 64


class _Hooks:
    """Forward hooks on the modules that ``ActivationMonitor(model)`` monitors (same API)."""

    def __init__(self, model: nn.Module) -> None:
        named = dict(model.named_modules())
        self.modules = {n: named[n] for n in ActivationMonitor(model).modules}
        self._handles: list = []

    def attach(self) -> None:
        self._handles = [m.register_forward_hook(self._make(n)) for n, m in self.modules.items()]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make(self, name: str):
        raise NotImplementedError


class NoopHook(_Hooks):
    """The floor: a forward hook that does nothing (the cost of having a hook at all)."""

    def _make(self, name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            return None

        return hook


class LayerMeanStdHook(_Hooks):
    """fastai-style ``ActivationStats``: per *layer* (not per unit) mean and std of each output,
    appended to a Python list with ``.item()`` (one host sync per statistic and call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.stats: dict[str, list[tuple[float, float]]] = {n: [] for n in self.modules}

    def _make(self, name: str):
        store = self.stats[name]

        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            o = out.detach()
            store.append((o.mean().item(), o.std().item()))

        return hook


class NaivePerUnitHook(_Hooks):
    """The obvious per-unit hook: running per-unit sum, sum of squares, min, max and the
    negative and zero counts, each a separate reduction of the output moved to
    ``(rows, units)``; no shift, no NaN/Inf handling, no staging."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.acc: dict[str, dict[str, torch.Tensor]] = {}

    def _make(self, name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            x = out.detach().movedim(1, -1).reshape(-1, out.shape[1])
            a = self.acc.get(name)
            if a is None:
                z = torch.zeros(x.shape[1], dtype=torch.float64)
                a = self.acc[name] = {"n": z.clone(), "s1": z.clone(), "s2": z.clone(),
                                      "min": z + torch.inf, "max": z - torch.inf,
                                      "neg": z.clone(), "zero": z.clone()}
            a["n"] += x.shape[0]
            a["s1"] += x.sum(0)
            a["s2"] += (x * x).sum(0)
            torch.minimum(a["min"], x.amin(0), out=a["min"])
            torch.maximum(a["max"], x.amax(0), out=a["max"])
            a["neg"] += (x < 0).sum(0)
            a["zero"] += (x == 0).sum(0)

        return hook


Arm = ActivationMonitor | _Hooks


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), ELU(),
        nn.Conv2d(32, 32, 3, padding=1), ELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), ELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def build(name: str, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    if name == "mlp":
        model = paper_mlp("elu")
        shape = (BATCH, 1, 28, 28)
    else:
        model = conv_net()
        shape = (BATCH, 3, 32, 32)
    model = model.to(device)
    xs = [torch.rand(shape, device=device) for _ in range(8)]
    if channels_last and len(shape) == 4:
        model = model.to(memory_format=torch.channels_last)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = [torch.randint(0, 10, (BATCH,), device=device) for _ in range(8)]
    return model, xs, ys


def make_step(model: nn.Module, xs, ys) -> Callable[[int], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xs[i % len(xs)]), ys[i % len(ys)])
        loss.backward()
        opt.step()

    return step


def _size(b: int) -> str:
    for unit, k in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= k and b % k == 0:
            return f"{b // k}{unit}"
    return str(b)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model, xs, ys = build(name, device, args.channels_last)
    step = make_step(model, xs, ys)
    monitors: dict[str, Arm | None] = {
        "off": None,
        "monitor": ActivationMonitor(model),
        "fastai": LayerMeanStdHook(model),
        "naive": NaivePerUnitHook(model),
    }
    if args.hist:
        monitors["hist"] = ActivationMonitor(model, histogram=dict(bins=64, range=(-2.0, 6.0)))
    if args.direct:
        monitors["direct"] = ActivationMonitor(model, buffer_bytes=0)
    if args.noop:
        monitors["noop"] = NoopHook(model)
    for b in args.buffer_bytes or ():
        monitors[f"buf={_size(b)}"] = ActivationMonitor(model, buffer_bytes=b)
    rounds = args.rounds if args.rounds is not None else (30 if name == "mlp" else 5)
    # enough warm-up steps to fill every staging buffer once: the first pass over a buffer
    # faults its pages in (~0.4 us per 4 KiB page), a cost a long run pays once; without it
    # the first 128 timed MLP steps of the default arm (4 MiB per module) carried it
    warmup = args.warmup if args.warmup is not None else (300 if name == "mlp" else 5)
    blocks = args.blocks if args.blocks is not None else (10 if name == "mlp" else 2)
    block = args.block
    clock = time.process_time if args.clock == "process" else time.perf_counter

    # warm-up: every arm, so that allocations, buffers and kernels exist before timing
    for mon in monitors.values():
        if mon is not None:
            mon.attach()
        for i in range(warmup):
            step(i)
        if mon is not None:
            mon.detach()
    sync(device)

    times: dict[str, list[float]] = {arm: [] for arm in monitors}
    per_round: dict[str, list[float]] = {arm: [] for arm in monitors}
    steps_seen: dict[str, int] = dict.fromkeys(monitors, 0)
    counter = 0
    for r in range(rounds):
        arms = list(monitors.items())
        if r % 2:  # A/B/C, C/B/A, ...: no arm always runs first
            arms.reverse()
        for arm, mon in arms:
            if mon is not None:
                mon.attach()
            these = []
            for _ in range(blocks):
                sync(device)
                t0 = clock()
                for _ in range(block):
                    step(counter)
                    counter += 1
                sync(device)
                these.append((clock() - t0) / block)
                steps_seen[arm] += block
            if mon is not None:
                mon.detach()
            times[arm] += these
            per_round[arm].append(statistics.median(these))

    # the work was real: every monitored forward of the timed and warm-up steps is counted
    for arm, mon in monitors.items():
        if not isinstance(mon, ActivationMonitor):
            continue
        df = mon.stats()
        samples = (steps_seen[arm] + warmup) * BATCH
        if name == "conv":  # channels: every position of the first conv's output is a sample
            df = df[df["module"] == "1"]
            samples *= 32 * 32
        assert (df["count"] + df["nonfinite"] == samples).all(), (arm, df["count"].iloc[0])

    base_med = statistics.median(times["off"])
    base_mean = statistics.fmean(times["off"])
    out: dict = {"steps_per_arm": steps_seen["off"], "rounds": rounds, "clock": args.clock,
                 "arms": {}}
    for arm, ts in times.items():
        med, mean = statistics.median(ts), statistics.fmean(ts)
        paired = sorted(a / b for a, b in zip(per_round[arm], per_round["off"]))
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        out["arms"][arm] = {
            "median_ms": med * 1e3, "mean_ms": mean * 1e3,
            "ratio_median": med / base_med, "ratio_mean": mean / base_mean,
            "ratio_paired": statistics.median(paired), "ratio_paired_q1": q[0],
            "ratio_paired_q3": q[2],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1; 0: leave torch's default)")
    p.add_argument("--models", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default 30 for mlp, 5 for conv)")
    p.add_argument("--blocks", type=int, default=None,
                   help="timed blocks per arm and round (default 10 mlp, 2 conv)")
    p.add_argument("--block", type=int, default=None,
                   help="steps per timed block (default 1 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per arm (default 300 for mlp: every staging buffer "
                        "filled once, up to 8 MiB per module; 5 for conv)")
    p.add_argument("--clock", choices=["wall", "process"], default=None,
                   help="wall (perf_counter) or process CPU time; default process on a CPU "
                        "with 1 thread (robust to other processes on a shared machine), else "
                        "wall")
    p.add_argument("--no-hist", dest="hist", action="store_false",
                   help="skip the arm with 64-bin histograms")
    p.add_argument("--direct", action="store_true",
                   help="also time ActivationMonitor(model, buffer_bytes=0)")
    p.add_argument("--noop", action="store_true", help="also time an empty hook (the floor)")
    p.add_argument("--buffer-bytes", type=int, nargs="+", default=None,
                   help="also time ActivationMonitor(model, buffer_bytes=B) for each B (the "
                        "staging sweep behind the default)")
    p.add_argument("--channels-last", action="store_true", help="conv net in channels_last")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.block is None:
        args.block = 10 if device.type == "cuda" else 1
    if args.clock is None:  # process CPU time counts OpenMP spin-waits when threads > 1
        args.clock = "process" if device.type == "cpu" and torch.get_num_threads() == 1 \
            else "wall"
    if device.type == "cuda" and args.clock == "process":
        p.error("--clock process cannot time GPU work; use --clock wall")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results: dict = {}
    start = time.perf_counter()
    for name in args.models:
        results[name] = bench_model(name, args, device)
    elapsed = time.perf_counter() - start

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"ActivationMonitor overhead per training step ({label}, torch {torch.__version__}, "
          f"batch {BATCH})")
    print(f"clock: {args.clock}; x = ratio to 'off' (paired: median over rounds of the "
          "per-round ratio of medians, with its quartiles)")
    print(f"{'model':6} {'arm':12} {'median ms':>10} {'mean ms':>10} {'median x':>9} "
          f"{'mean x':>8} {'paired x [q1, q3]':>22}")
    for name, r in results.items():
        for arm, a in r["arms"].items():
            print(f"{name:6} {arm:12} {a['median_ms']:10.3f} {a['mean_ms']:10.3f} "
                  f"{a['ratio_median']:9.3f} {a['ratio_mean']:8.3f} "
                  f"{a['ratio_paired']:8.3f} [{a['ratio_paired_q1']:.3f}, "
                  f"{a['ratio_paired_q3']:.3f}]")
    for name, r in results.items():  # the histograms' own cost, over the plain monitor
        if "hist" in r["arms"]:
            h, m = r["arms"]["hist"], r["arms"]["monitor"]
            r["histogram_extra"] = {"median": h["median_ms"] / m["median_ms"],
                                    "mean": h["mean_ms"] / m["mean_ms"]}
            print(f"{name}: histograms over the plain monitor "
                  f"{r['histogram_extra']['median']:.3f}x median, "
                  f"{r['histogram_extra']['mean']:.3f}x mean")
    print(f"({elapsed:.0f} s)")
    if args.json:
        from biasshift.io import provenance, write_json

        write_json({"device": label, "batch": BATCH, "results": results,
                    "provenance": provenance(args=vars(args))}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
