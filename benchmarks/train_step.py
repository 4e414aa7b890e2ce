"""Train-step time of every method vs PEFT baselines, the floor and an official-style rebuild layer.

One interleaved run on ViT-B/16 layer shapes (timm ``vit_base_patch16_224``, random weights: the
timing does not depend on the values). Every variant adapts the same layers (``timm_vit``:
qkv, proj, fc1, fc2 of every block) and runs the same step: forward, cross-entropy, backward,
AdamW step. Reported per variant: trainable parameters and the median step time relative to

* ``peft_lora``: PEFT LoRA at the same rank ``r`` (for ^A and LoRA ``r(out+in)`` parameters per
  layer are equal, so this is also the equal-parameter comparison for ^A);
* ``floor``: the frozen base back-propagating to its input, which any adapter placed in every
  layer must pay;
* and the merged-inference forward vs the base forward.

The ``rebuild`` variant is the official Spectral Adapter implementation style: it rebuilds the
full weight ``(U₁+A_U) Σ₁ (V₁+A_V)ᵀ + W_rest`` every step instead of the delta form.

    python benchmarks/train_step.py                 # ViT-B/16, 12 blocks, batch 4, 224 px
    python benchmarks/train_step.py --depth 2 --reps 5   # quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from spectral_vision.baselines import BASELINES, attach_adapter


class RebuildSpectralA(nn.Module):
    """Official-style ^A layer: rebuilds the full weight from its SVD at every forward."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        b = sv.decompose(base.weight, method="exact")
        self.register_buffer("U", b.U)  # (out, m)
        self.register_buffer("S", b.S)  # (m,)
        self.register_buffer("V", b.V)  # (in, m)
        self.bias = base.bias
        self.r = r
        self.A_U = nn.Parameter(torch.zeros(b.U.shape[0], r))
        self.A_V = nn.Parameter(torch.zeros(b.V.shape[0], r))

    def forward(self, x):
        U = torch.cat([self.U[:, : self.r] + self.A_U, self.U[:, self.r:]], 1)
        V = torch.cat([self.V[:, : self.r] + self.A_V, self.V[:, self.r:]], 1)
        return F.linear(x, (U * self.S) @ V.T, self.bias)


def build(variant: str, args) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=args.depth, num_classes=100)
    model.train()
    if variant in ("floor", "base"):
        model.requires_grad_(False)
    elif variant == "rebuild":
        model.requires_grad_(False)
        for name, m in list(model.named_modules()):
            for child in ("qkv", "proj", "fc1", "fc2"):
                sub = getattr(m, child, None)
                if isinstance(sub, nn.Linear) and ".blocks." in f".{name}." and "patch_embed" not in name:
                    setattr(m, child, RebuildSpectralA(sub, args.rank))
    else:
        method = variant.removeprefix("peft_")
        attach_adapter(model, method, args.rank, "timm_vit")
    return model


def step_fn(variant: str, model: nn.Module, args):
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 100, (args.batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        if variant == "floor":
            xi = x.clone().requires_grad_(True)
            F.cross_entropy(model(xi), y).backward()
            return
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_fn(model, args):
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    @torch.no_grad()
    def run():
        model(x)

    return run


def timeit(fn, reps: int, times: list[float]) -> None:
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12, help="ViT-B blocks (12 = full ViT-B/16)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant (interleaved rounds)")
    p.add_argument("--methods", nargs="*", default=None, help="spectral methods (default: all registered)")
    p.add_argument("--baselines", nargs="*", default=["lora"], help=f"PEFT baselines from {BASELINES}")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods if args.methods is not None else sv.available_methods()
    variants = ["floor", "rebuild", *[f"peft_{b}" for b in args.baselines], *methods]
    models = {v: build(v, args) for v in variants}
    steps = {v: step_fn(v, m, args) for v, m in models.items()}
    times = {v: [] for v in variants}
    for fn in steps.values():  # warm-up (allocator, caches)
        fn()
    for _ in range(args.reps):  # interleaved: every round runs every variant once
        for v in variants:
            timeit(steps[v], 1, times[v])
    med = {v: statistics.median(t) for v, t in times.items()}
    ref = "peft_lora" if "peft_lora" in med else variants[2]
    print(f"ViT-B/16 shapes, depth {args.depth}, batch {args.batch}, {args.image_size}px, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved reps, median step")
    print(f"| variant | trainable params | step (ms) | / {ref} | / floor |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        n = sum(p.numel() for p in models[v].parameters() if p.requires_grad)
        print(f"| {v} | {n:,} | {1000 * med[v]:.1f} | {med[v] / med[ref]:.2f}x | {med[v] / med['floor']:.2f}x |")

    # merged inference vs base (spectral_a if timed, else the first method; merged in place)
    which = "spectral_a" if "spectral_a" in methods else (methods[0] if methods else None)
    base, merged = build("base", args).eval(), models[which].eval() if which else None
    if merged is not None:
        sv.merge(merged)
        runs = {"base": infer_fn(base, args), "merged": infer_fn(merged, args)}
        t = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.reps):
            for k, fn in runs.items():
                timeit(fn, 1, t[k])
        mb, mm = statistics.median(t["base"]), statistics.median(t["merged"])
        print(f"\nmerged {which} inference / base inference: {mm / mb:.2f}x ({1000 * mm:.1f} vs {1000 * mb:.1f} ms)")


if __name__ == "__main__":
    main(parse_args())
