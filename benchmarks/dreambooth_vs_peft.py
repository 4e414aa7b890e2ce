"""Peak memory and step time of the DreamBooth training step: spectral adapter vs diffusers-style PEFT LoRA.

Both variants run the **same** step from ``training/dreambooth_spectral.py`` (VAE encode, noise, UNet
forward, MSE, ``accelerator.backward``, grad clipping, AdamW step) on the same pipeline, batch,
resolution, rank and seeds. They differ only in the adapter on the UNet attention projections:

* ``spectral``: the script's ``add_adapters`` (``--adapter``, default ``spectral_a``, band 0);
* ``peft_lora``: what diffusers' ``train_dreambooth_lora.py`` does:
  ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``.

Each measurement is a fresh worker process (clean memory), and the variants alternate within every round
(interleaved, one run). Memory on CPU is the **resident set size (RSS, Linux /proc)**: the adapter's static
part (RSS after attaching minus before) plus the training peak (``VmHWM`` peak RSS during the steps, reset
through ``/proc/self/clear_refs`` just before them, minus the RSS at that moment): activations, gradients and
optimizer state. On CUDA the same two parts come from ``torch.cuda.max_memory_allocated``. Time is the
median wall time of the timed steps (after warm-up).

    python benchmarks/dreambooth_vs_peft.py                       # builtin:tiny-sd, 32 px, batch 2, rank 4
    python benchmarks/dreambooth_vs_peft.py --resolution 64 --rounds 5 --steps 20
    python benchmarks/dreambooth_vs_peft.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("spectral", "peft_lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("setting (both variants)")
    g.add_argument("--model", default="builtin:tiny-sd", help="pipeline: builtin:tiny-sd, hub id or local folder")
    g.add_argument("--adapter", default="spectral_a", help="spectral method of the script")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    g.add_argument("--batch_size", type=int, default=2)
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    g = p.add_argument_group("measurement")
    g.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once, order alternating")
    g.add_argument("--steps", type=int, default=12, help="timed steps per worker")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per worker")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    g.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory probes ----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Memory:
    """Bytes in use and peak since :meth:`reset`: CUDA allocator stats, else Linux RSS / VmHWM."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.metric = "torch.cuda.max_memory_allocated" if self.cuda else "RSS (VmRSS/VmHWM, /proc)"

    def current(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else _status_kb("VmRSS") * 1024

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
                f.write("5")

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else _status_kb("VmHWM") * 1024


# ---- one worker: one variant ------------------------------------------------------------------------------------
def attach_peft_lora(unet, rank: int) -> None:
    """diffusers' train_dreambooth_lora.py adapter, exactly as the example adds it."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))


def worker(args) -> dict:
    import torch

    from accelerate import Accelerator

    from training import dreambooth_spectral as db
    from training.common import cast_frozen_, step_seed

    torch.set_num_threads(args.threads)
    dargs = db.parse_args(["--pretrained_model_name_or_path", args.model, "--adapter", args.adapter,
                           "--rank", str(args.rank), "--band", "0", "--report_to", "none", "--no_register",
                           "--train_batch_size", str(args.batch_size), "--seed", "0",
                           "--output_dir", tempfile.mkdtemp(prefix="dreambooth_bench_")]
                          + (["--resolution", str(args.resolution)] if args.resolution else []))
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    mem = Memory(accelerator.device)
    inputs = db.prepare_inputs(dargs)
    models = db.load_models(dargs)
    dargs.resolution = dargs.resolution or models.unet.config.sample_size * models.vae_scale_factor
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    before = mem.current()
    if args.worker == "spectral":
        db.add_adapters(dargs, models, band=0)
    else:
        attach_peft_lora(models.unet, args.rank)
    for model in (models.unet, models.vae, models.text_encoder):
        cast_frozen_(model, weight_dtype).to(accelerator.device)
    trainable = sum(p.numel() for p in models.unet.parameters() if p.requires_grad)
    static = mem.current() - before
    optimizer = db.make_optimizer(dargs, {"unet": models.unet})
    unet, optimizer = accelerator.prepare(models.unet, optimizer)
    dataset = db.make_dataset(dargs, models.tokenizer, inputs)
    batch = db.collate_fn([dataset[(i % len(dataset), step_seed(0, i))] for i in range(args.batch_size)])
    params = [p for p in unet.parameters() if p.requires_grad]

    def step(i: int) -> float:
        gen = torch.Generator(accelerator.device).manual_seed(step_seed(0, i))
        t0 = time.perf_counter()
        loss = db.compute_loss(dargs, batch, unet, models.text_encoder, models.vae, models.noise_scheduler,
                               weight_dtype, gen)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, dargs.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    mem.reset()
    at_reset = mem.current()
    for i in range(args.warmup):
        step(i)
    times = [step(args.warmup + i) for i in range(args.steps)]
    return {"variant": args.worker, "median_step_s": statistics.median(times), "trainable": trainable,
            "static_bytes": static, "train_peak_bytes": mem.peak() - at_reset, "memory_metric": mem.metric,
            "device": str(accelerator.device), "resolution": dargs.resolution}


# ---- driver -----------------------------------------------------------------------------------------------------
def run_worker(variant: str, argv: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run([sys.executable, __file__, *argv, "--worker", variant], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(args) -> dict:
    argv = sys.argv[1:]
    results = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            res = run_worker(variant, argv)
            results[variant].append(res)
            print(f"round {r} {variant:9s} step {res['median_step_s'] * 1e3:8.2f} ms  static "
                  f"{res['static_bytes'] / 2**20:7.2f} MiB  train peak {res['train_peak_bytes'] / 2**20:7.2f} MiB",
                  flush=True)
    summary = {}
    for v, rs in results.items():
        summary[v] = {"step_ms": statistics.median(x["median_step_s"] for x in rs) * 1e3,
                      "memory_mib": statistics.median(x["static_bytes"] + x["train_peak_bytes"] for x in rs) / 2**20,
                      "trainable": rs[0]["trainable"]}
    s, p = summary["spectral"], summary["peft_lora"]
    first = results["spectral"][0]
    print(f"\n{args.model} ({first['resolution']} px), batch {args.batch_size}, rank {args.rank}, "
          f"mixed precision {args.mixed_precision}, device {first['device']}, {args.rounds} interleaved rounds x "
          f"{args.steps} timed steps; memory = {first['memory_metric']} (adapter static + training peak)")
    print(f"{'variant':26s} {'trainable':>10s} {'step ms':>9s} {'memory MiB':>11s}")
    for name, v in ((f"{args.adapter} (this script)", s), ("PEFT LoRA (diffusers)", p)):
        print(f"{name:26s} {v['trainable']:10,d} {v['step_ms']:9.2f} {v['memory_mib']:11.2f}")
    paired = statistics.median(a["median_step_s"] / b["median_step_s"]
                               for a, b in zip(results["spectral"], results["peft_lora"]))
    ratios = {"time": s["step_ms"] / p["step_ms"], "time_paired": paired,
              "memory": s["memory_mib"] / max(p["memory_mib"], 1e-9)}
    print(f"ratio spectral/PEFT: time {ratios['time']:.3f}x (median of per-round ratios {paired:.3f}x; "
          f"target <= 1.05x), memory {ratios['memory']:.3f}x (target <= 1.0x)")
    return {"summary": summary, "ratios": ratios}


if __name__ == "__main__":
    a = parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
    else:
        main(a)
