"""Train-step time and peak memory of every method vs PEFT LoRA, the floor and full fine-tuning, in one run.

Models (random weights from the real architecture configs; the timing does not depend on the values):

* ``vit_b16``: timm ``vit_base_patch16_224``, ``--image_size`` px, 1000 classes, targets ``timm_vit``
  (qkv, proj, fc1, fc2 of every block), cross-entropy on random labels.
* ``sd15_unet``: diffusers ``UNet2DConditionModel`` with the Stable Diffusion 1.5 config (below),
  ``--latent_size`` latents, 77x768 text states, targets ``sd_unet`` (attention to_q/k/v/out.0),
  MSE to random noise. ``tiny_vit`` / ``tiny_unet`` are the shrunk zoo models (smoke tests).

Variants, all on the same model, targets and rank, stepped in interleaved rounds: ``floor`` (frozen
model back-propagating to its input: what any adapter in every layer pays at least), ``full``
(full fine-tuning), ``peft_<b>`` (PEFT baselines, LoRA by default), every spectral method in its
default (``auto``) forward form, and ``<method>:delta`` / ``<method>:weight`` with ``--forms``.
A step is forward (under ``--dtype`` autocast), loss, backward, AdamW step, ``zero_grad``; the
reported time is the median of ``--steps`` timed steps after ``--warmup`` (``torch.cuda.synchronize``
around each). CUDA peak memory per variant = its persistent tensors (parameters, buffers, optimizer
state) + the peak allocated during one step above what was allocated before it.

    python benchmarks/train_step.py --device cuda --dtype bf16 --batch 64            # ViT-B/16, r=8
    python benchmarks/train_step.py --device cuda --dtype bf16 --model sd15_unet     # batch 4, 64x64, r=4
    python benchmarks/train_step.py --runs eager compile                             # both in one run
    python benchmarks/train_step.py --model tiny_vit --batch 2 --warmup 1 --steps 2  # CPU smoke

Writes ``train_step_<model>_<device>_<dtype>.{md,json}`` to ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv  # noqa: E402
from spectral_vision.baselines import BASELINES, attach_adapter  # noqa: E402
from spectral_vision.fastpath import set_forward_form  # noqa: E402
from spectral_vision.fileio import atomic_write_json, atomic_write_text  # noqa: E402

METHODS = ("spectral_a", "spectral_r", "svdiff", "speclora", "lorsa")
T0 = time.perf_counter()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from diffusers' defaults included)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
MODELS = {  # name: (family, default rank, default batch, targets)
    "vit_b16": ("vit", 8, 64, "timm_vit"), "tiny_vit": ("vit", 4, 2, "timm_vit"),
    "sd15_unet": ("unet", 4, 4, "sd_unet"), "tiny_unet": ("unet", 2, 2, "sd_unet"),
}


def build_base(args) -> nn.Module:
    """The frozen-architecture base model on the CPU (random weights, seeded)."""
    torch.manual_seed(0)
    if args.model == "vit_b16":
        import timm

        kw = {"depth": args.depth} if args.depth else {}
        return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=args.image_size, **kw)
    if args.model == "sd15_unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**{**SD15_UNET, "sample_size": args.latent_size})
    from spectral_vision.zoo import create_model

    return create_model(args.model.replace("_", "-"))


def make_variant(base: nn.Module, variant: str, args) -> nn.Module:
    """A copy of ``base`` set up as ``variant`` (adapters attached on the CPU, then moved to the device)."""
    model = copy.deepcopy(base).train()
    method, _, form = variant.partition(":")
    if method == "floor":
        model.requires_grad_(False)
    elif method == "full":
        model.requires_grad_(True)
    else:
        kw = {"progress": False} if not method.startswith("peft_") else {}
        if method == "lorsa" and args.model.startswith("tiny"):
            kw["options"] = {"k": 16}
        attach_adapter(model, method.removeprefix("peft_"), args.rank, args.targets, **kw)
        if form:
            set_forward_form(model, form)
    if args.grad_ckpt:
        if args.family == "vit":
            model.set_grad_checkpointing(True)
        else:
            model.enable_gradient_checkpointing()
    return model.to(args.device)


def make_inputs(args, g: torch.Generator) -> dict:
    dev = args.device
    if args.family == "vit":
        size = 32 if args.model == "tiny_vit" else args.image_size
        return {"x": torch.randn(args.batch, 3, size, size, generator=g).to(dev),
                "y": torch.randint(0, 10 if args.model == "tiny_vit" else 1000, (args.batch,), generator=g).to(dev)}
    lat = 8 if args.model == "tiny_unet" else args.latent_size
    ctx = 32 if args.model == "tiny_unet" else 768
    return {"x": torch.randn(args.batch, 4, lat, lat, generator=g).to(dev),
            "t": torch.randint(0, 1000, (args.batch,), generator=g).to(dev),
            "c": torch.randn(args.batch, 77, ctx, generator=g).to(dev),
            "y": torch.randn(args.batch, 4, lat, lat, generator=g).to(dev)}


def loss_fn(model, inp: dict, x: torch.Tensor, family: str) -> torch.Tensor:
    if family == "vit":
        return F.cross_entropy(model(x).float(), inp["y"])
    return F.mse_loss(model(x, inp["t"], encoder_hidden_states=inp["c"]).sample.float(), inp["y"])


class Runner:
    """One variant: its model, optimizer and a ``step()`` closure."""

    def __init__(self, name: str, model: nn.Module, args, inputs: dict):
        self.name, self.model, self.args, self.inputs = name, model, args, inputs
        params = [p for p in model.parameters() if p.requires_grad]
        self.floor = not params
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.trainable = sum(p.numel() for p in params)
        self.fwd = model
        dt = DTYPES[args.dtype]
        self.autocast = (torch.autocast(args.device.split(":")[0], dtype=dt) if dt != torch.float32
                         else nullcontext())

    def compile(self, scope: str) -> None:
        if scope == "model":
            self.fwd = torch.compile(self.model, backend=self.args.compile_backend)
            return
        # regional compilation (as diffusers' compile_repeated_blocks): identical blocks share compiled graphs
        blocks = ([b for b in self.model.blocks] if self.args.family == "vit" else
                  [m for m in self.model.modules() if type(m).__name__ == "BasicTransformerBlock"])
        for b in blocks:
            b.compile(backend=self.args.compile_backend)

    def step(self) -> None:
        x = self.inputs["x"]
        if self.floor:
            x = x.detach().requires_grad_(True)
        with self.autocast:
            loss = loss_fn(self.fwd, self.inputs, x, self.args.family)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def persistent_bytes(self) -> int:
        ts = list(self.model.parameters()) + list(self.model.buffers())
        if self.opt is not None:
            ts += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in ts)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(runner: Runner, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    runner.step()
    sync(device)
    return time.perf_counter() - t


def peak_memory(runner: Runner, device: str):
    """Peak MiB of one step of this variant (persistent tensors + step peak), CUDA only."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.step()
    sync(device)
    return (runner.persistent_bytes() + torch.cuda.max_memory_allocated() - before) / 2**20


def measure(runners: dict, args, label: str, compile_scope=None) -> dict:
    """Warm-up (and compilation), interleaved timed rounds, then one memory step per variant; returns
    per-variant stats. Variants that would start after ``--time_budget`` are skipped (and listed)."""
    t0, skipped = time.perf_counter(), []
    for v, r in list(runners.items()):
        if args.time_budget and time.perf_counter() - T0 > args.time_budget:
            skipped.append(v)
            continue
        if compile_scope:
            r.compile(compile_scope)
        for _ in range(args.warmup):
            r.step()
        sync(args.device)
    runners = {v: r for v, r in runners.items() if v not in skipped}
    if skipped:
        print(f"[{label}] time budget: skipped {skipped}", flush=True)
    warm_s = time.perf_counter() - t0
    times = {v: [] for v in runners}
    for _ in range(args.steps):
        for v, r in runners.items():
            times[v].append(timed(r, args.device))
    out = {}
    for v, r in runners.items():
        out[v] = {"trainable": r.trainable, "step_ms": 1000 * statistics.median(times[v]),
                  "step_ms_all": [round(1000 * t, 3) for t in times[v]], "peak_mib": peak_memory(r, args.device)}
    ref = next((v for v in runners if v.startswith("peft_lora")), None)
    for v in out:
        for key, base in (("x_lora", ref), ("x_floor", "floor"), ("x_full", "full")):
            out[v][key] = out[v]["step_ms"] / out[base]["step_ms"] if base in out else None
    print(f"[{label}] warm-up {warm_s:.1f}s, {args.steps} interleaved rounds", flush=True)
    return {**out, **{v: {"skipped": "time budget"} for v in skipped}}


@torch.no_grad()
def merged_inference(base_runner: Runner, method_runner: Runner, args) -> dict:
    """Merged-adapter inference vs the base model (same forward, so ≈ 1.00x); unmerges afterwards."""
    sv.merge(method_runner.model)
    models = {"base": base_runner.model.eval(), "merged": method_runner.model.eval()}
    x, t = method_runner.inputs["x"], {k: [] for k in models}
    for _ in range(max(2, args.steps // 2) + 1):
        for k, m in models.items():
            sync(args.device)
            t0 = time.perf_counter()
            with method_runner.autocast:
                m(x) if args.family == "vit" else m(x, method_runner.inputs["t"],
                                                    encoder_hidden_states=method_runner.inputs["c"])
            sync(args.device)
            t[k].append(time.perf_counter() - t0)
    mb, mm = statistics.median(t["base"][1:]), statistics.median(t["merged"][1:])
    sv.unmerge(method_runner.model)
    for m in models.values():
        m.train()
    return {"method": method_runner.name, "base_ms": 1000 * mb, "merged_ms": 1000 * mm, "ratio": mm / mb}


def table(res: dict, label: str) -> str:
    lines = [f"**{label}**", "", "| variant | trainable | step (ms) | x PEFT LoRA | x floor | x full FT | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def f(v, spec):
        return "" if v is None else format(v, spec)

    for v, s in res.items():
        if "skipped" in s:
            lines.append(f"| {v} | skipped ({s['skipped']}) | | | | | |")
            continue
        lines.append(f"| {v} | {s['trainable']:,} | {s['step_ms']:.1f} | {f(s['x_lora'], '.2f')} | "
                     f"{f(s['x_floor'], '.2f')} | {f(s['x_full'], '.2f')} | {f(s['peak_mib'], '.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    g.add_argument("--batch", type=int, default=None, help="default: 64 (vit_b16), 4 (sd15_unet), 2 (tiny)")
    g.add_argument("--rank", type=int, default=None, help="default: 8 (vit_b16), 4 (sd15_unet)")
    g.add_argument("--image_size", type=int, default=224, help="vit_b16 input size")
    g.add_argument("--latent_size", type=int, default=64, help="sd15_unet latent size (64 = 512 px images)")
    g.add_argument("--depth", type=int, default=None, help="vit_b16 blocks (default 12; fewer for CPU runs)")
    g = p.add_argument_group("variants")
    g.add_argument("--methods", nargs="*", default=None, help=f"spectral methods (default: {' '.join(METHODS)})")
    g.add_argument("--baselines", nargs="*", default=["lora"], help=f"PEFT baselines from {BASELINES}")
    g.add_argument("--forms", nargs="*", default=[], choices=["delta", "weight"],
                   help="also time every method with this forward form forced (variants <method>:<form>)")
    g.add_argument("--no_full", action="store_true", help="skip full fine-tuning (e.g. to save memory)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="autocast dtype (default bf16 on cuda)")
    g.add_argument("--runs", nargs="+", choices=["eager", "compile"], default=None, help="default: eager")
    g.add_argument("--compile", action="store_true", help="same as --runs compile")
    g.add_argument("--compile_scope", choices=["blocks", "model"], default="blocks",
                   help="torch.compile the repeated blocks (fast to compile) or the whole model")
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: CPU tests)")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (timm / diffusers)")
    g.add_argument("--warmup", type=int, default=10)
    g.add_argument("--steps", type=int, default=15, help="timed steps per variant (interleaved rounds)")
    g.add_argument("--time_budget", type=float, default=None,
                   help="seconds since start after which no further variant is warmed up / compiled (skipped)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    g.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)
    family, rank, batch, targets = MODELS[args.model]
    args.family, args.targets = family, targets
    args.rank = args.rank or rank
    args.batch = args.batch or batch
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.runs = args.runs or (["compile"] if args.compile else ["eager"])
    if args.compile and "compile" not in args.runs:
        args.runs.append("compile")
    args.methods = [m for m in (METHODS if args.methods is None else args.methods)]
    unknown = [m for m in args.methods if m not in sv.available_methods()]
    if unknown:
        p.error(f"unknown methods {unknown}; available: {sv.available_methods()}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if min(args.batch, args.rank, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --rank and --steps must be >= 1, --warmup >= 0")
    return args


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    # priority order (a --time_budget cut drops the last ones): floor, LoRA, ^A, ^R, full FT, the rest
    variants = ["floor", *[f"peft_{b}" for b in args.baselines], *args.methods[:2], *([] if args.no_full else ["full"]),
                *args.methods[2:], *[f"{m}:{f}" for f in args.forms for m in args.methods]]
    t0 = time.perf_counter()
    base = build_base(args)
    inputs = make_inputs(args, torch.Generator().manual_seed(1))
    order = sorted(variants, key=lambda v: not v.startswith("svdiff"))  # svdiff first: fills the full-SVD cache
    built = {v: make_variant(base, v, args) for v in order}
    runners = {v: Runner(v, built[v], args, inputs) for v in variants}
    build_s = time.perf_counter() - t0
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {"model": args.model, "device": args.device, "device_name": dev_name, "dtype": args.dtype,
            "batch": args.batch, "rank": args.rank, "grad_ckpt": args.grad_ckpt, "warmup": args.warmup,
            "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "build_s": round(build_s, 1),
            "compile_scope": args.compile_scope, "forward_form_env": os.environ.get("SPECTRAL_VISION_FORWARD")}
    amp = f"{args.dtype} autocast" if args.dtype != "fp32" else "fp32"
    head = (f"{args.model}, batch {args.batch}, rank {args.rank}, {amp}, {dev_name} ({args.device}), "
            f"torch {torch.__version__}, {meta['date']}, median of {args.steps} steps after {args.warmup} warm-up"
            + (", gradient checkpointing" if args.grad_ckpt else ""))
    print(head, f"(built in {build_s:.0f}s)", flush=True)
    result = {"meta": meta, "runs": {}}
    md = [f"# train step: {head}", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step_{args.model}_{args.device.split(':')[0]}_{args.dtype}{args.tag}"
    for run in args.runs:
        label = run if run == "eager" else f"torch.compile ({args.compile_scope})"
        todo = runners if run == "eager" else {v: r for v, r in runners.items() if ":" not in v}  # forms: eager only
        res = measure(todo, args, label, args.compile_scope if run == "compile" else None)
        result["runs"][run] = res
        md += [table(res, label), ""]
        print(table(res, label), "\n", flush=True)
        which = "spectral_a" if "spectral_a" in res else next((m for m in args.methods if m in res), None)
        if run == "eager" and which is not None and "skipped" not in res[which] and "skipped" not in res["floor"]:
            result["merged_inference"] = inf = merged_inference(runners["floor"], runners[which], args)
            line = (f"merged {inf['method']} inference / base inference: {inf['ratio']:.2f}x "
                    f"({inf['merged_ms']:.1f} vs {inf['base_ms']:.1f} ms)")
            md += [line, ""]
            print(line, flush=True)
        atomic_write_json(out / f"{stem}.json", result)  # after every run: a timeout keeps what was measured
        atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    print(f"wrote {out / stem}.{{md,json}}", flush=True)
    return result


if __name__ == "__main__":
    main(parse_args())
