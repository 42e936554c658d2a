"""Benchmark the CIFAR pipeline: GCN, ZCA fit/transform, pad/crop/flip, and the conv nets.

Synthetic uint8 images of CIFAR's shape are put on the device once (as training does), then each
stage is timed with the device synchronised around the timed region only. Prints one JSON object.

    python analyses/bench_cifar_pipeline.py --device cuda               # full CIFAR size
    python analyses/bench_cifar_pipeline.py --device cpu --n 5000 --small
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from biasshift.data import ZCA, global_contrast_normalize, pad_crop_flip
from biasshift.models import cifar_conv11, cifar_conv18, count_parameters, imagenet_conv15
from biasshift.timing import best_of


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up), in seconds."""
    return best_of(fn, repeat, device)


def train_step_rate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device, repeat: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return x.shape[0] / timed(step, device, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=50000, help="training images (CIFAR: 50000)")
    ap.add_argument("--batch", type=int, default=100, help="mini-batch (the paper: 100)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="skip conv18 and the ImageNet net")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    g = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, device=device,
                        generator=g)
    x = raw.float().div_(255)
    res: dict[str, object] = {"device": str(device), "n": args.n, "batch": args.batch,
                              "torch": torch.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    res["gcn_s"] = timed(lambda: global_contrast_normalize(x), device, args.repeat)
    gx = global_contrast_normalize(x)
    res["zca_fit_float64_s"] = timed(lambda: ZCA().fit(gx), device, 1)
    zca = ZCA().fit(gx)
    res["zca_transform_float32_s"] = timed(lambda: zca.transform(gx), device, args.repeat)
    wx = zca.transform(gx)

    idx = torch.randperm(args.n, device=device, generator=g)[: args.batch]
    batch = wx[idx]
    res["pad_crop_flip_batch_images_per_s"] = args.batch / timed(
        lambda: pad_crop_flip(batch, generator=g), device, args.repeat * 10)
    res["pad_crop_flip_all_images_per_s"] = args.n / timed(
        lambda: pad_crop_flip(wx, generator=g), device, args.repeat)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        pad_crop_flip(wx, generator=g)
        res["pad_crop_flip_all_peak_extra_MiB"] = (
            torch.cuda.max_memory_allocated(device) - base) / 2**20

    y = torch.randint(0, 100, (args.batch,), device=device, generator=g)
    builders = {"cifar_conv11": cifar_conv11} if args.small else \
        {"cifar_conv11": cifar_conv11, "cifar_conv18": cifar_conv18}
    for name, build in builders.items():
        for act in ("elu", "relu"):
            net = build(act).to(device).train()
            crops = pad_crop_flip(batch, generator=g)
            res[f"{name}_{act}_train_images_per_s"] = train_step_rate(net, crops, y, device,
                                                                      args.repeat)
        res[f"{name}_parameters"] = count_parameters(net)
    if not args.small:
        for act in ("elu", "relu"):
            net = imagenet_conv15(act).to(device).train()
            b = 32 if device.type == "cuda" else 2
            xi = torch.randn(b, 3, 224, 224, device=device, generator=g)
            yi = torch.randint(0, 1000, (b,), device=device, generator=g)
            res[f"imagenet_conv15_{act}_train_images_per_s"] = train_step_rate(
                net, xi, yi, device, args.repeat)
            del net
    if device.type == "cuda":
        res["peak_memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
                     indent=2))


if __name__ == "__main__":
    main()
