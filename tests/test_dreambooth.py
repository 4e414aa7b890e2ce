"""DreamBooth script on the offline builtin:tiny-sd (32 px): run, replay after SIGKILL, LoRA export, DDP, bad inputs,
diffusers' flag set, the benchmark's worker (inputs and captions: test_dreambooth_data.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (DB_BASE, DB_TRAIN, DREAMBOOTH_SCRIPT, reset_accelerate, run_dreambooth, saved_adapter_hash,
                     subprocess_env)
from training import common
from training import dreambooth_spectral as db

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run in this process (1 thread, as the subprocesses), registered in a concepts folder."""
    cache = str(tmp_path_factory.getbasetemp() / "svcache")  # the folder conftest gives every test
    concepts = tmp_path_factory.mktemp("concepts")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_VISION_CACHE", cache)
        torch.set_num_threads(1)
        try:
            summary = run_dreambooth(DB_TRAIN + ["--output_dir", str(concepts / "cat"), "--validation_prompt", "a sks cat",
                                        "--num_validation_images", "1", "--validation_inference_steps", "2",
                                        "--validation_epochs", "1", "--report_to", "tensorboard"])
        finally:
            torch.set_num_threads(threads)
    return concepts / "cat", summary


# ---- a short run --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_run_outputs(run):
    out, summary = run
    assert summary["global_step"] == 10 and torch.isfinite(torch.tensor(summary["final_loss"]))
    for comp, lr in (("unet", 5e-4), ("text_encoder", 5e-6)):  # the default --learning_rate / --text_encoder_lr
        t = load_file(str(out / comp / "adapter_model.safetensors"))
        a_u = [v for k, v in t.items() if k.endswith("A_U")]
        assert a_u and all(v.dtype == torch.float32 for v in a_u)
        # trained away from the zero init: Adam moves a weight by about lr per update (5 updates at full lr here)
        assert 2 * lr < max(v.abs().max().item() for v in a_u) < 20 * lr
    assert summary["adapter_sha256_per_rank"] == [saved_adapter_hash(out)]
    assert [p.name for _, p in common.list_checkpoints(out)] == ["checkpoint-8", "checkpoint-10"]  # total_limit 2
    args = json.loads((out / "training_args.json").read_text())
    assert args["args"]["band"] == "0" and args["summary"]["band"] == 0 and args["args"]["seed"] == 0
    card = (out / "README.md").read_text()
    assert "RANDOM weights" in card and "band 0" in card and "rank 4" in card
    assert f"{summary['trainable_params']:,}" in card
    # 4 instance images, batch 1 x 2 accumulation: 2 updates per epoch, 5 epochs, validation after each
    assert (out / "image_0.png").exists() and sorted(p.name for p in (out / "validation").iterdir()) == \
        [f"epoch{e:04d}_0.png" for e in range(5)]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    registry = json.loads((out.parent / "bands.json").read_text())
    assert registry["concepts"]["cat"]["columns"] == [0, 1, 2, 3]


@pytest.mark.slow
def test_exported_lora_loads_in_diffusers(run):
    import spectral_vision as sv
    from spectral_vision.integrations.diffusers import load_pipeline

    out, _ = run
    x, ids = torch.randn(1, 4, 16, 16), torch.randint(0, 49406, (1, 77))

    def outputs(pipe):
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
            return hidden, pipe.unet(x, 10, hidden).sample

    base = outputs(load_pipeline("builtin:tiny-sd"))
    ours = load_pipeline("builtin:tiny-sd")
    sv.load_adapter(ours.unet, out / "unet")
    sv.load_adapter(ours.text_encoder, out / "text_encoder")
    ours = outputs(ours)
    assert (ours[1] - base[1]).abs().max() > 1e-3  # the adapter does something
    for name in db.LORA_FILES.values():
        pipe = load_pipeline("builtin:tiny-sd")
        pipe.load_lora_weights(str(out), weight_name=name)
        got = outputs(pipe)
        torch.testing.assert_close(got[0], ours[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], ours[1], atol=1e-5, rtol=1e-4)


# ---- checkpoints -----------------------------------------------------------------------------------------------
def test_incomplete_checkpoints_are_never_latest(tmp_path):
    def write(d):
        os.makedirs(d)
        Path(d, "state.bin").write_text("x")

    common.save_checkpoint(tmp_path, 3, write)
    (tmp_path / "checkpoint-7").mkdir()  # half-written by a non-atomic writer: no completion marker
    (tmp_path / "checkpoint-9.tmp").mkdir()  # an interrupted atomic save
    assert common.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-3"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        common.resolve_resume(tmp_path, "checkpoint-7")
    with pytest.raises(FileNotFoundError):
        common.resolve_resume(tmp_path, "checkpoint-5")
    assert common.resolve_resume(tmp_path / "empty", "latest") is None
    common.save_checkpoint(tmp_path, 5, write, total_limit=1)  # rotation also removes the stale .tmp
    assert [s for s, _ in common.list_checkpoints(tmp_path)] == [5] and not (tmp_path / "checkpoint-9.tmp").exists()


def test_resume_after_sigkill_replays_the_run(run, tmp_path):
    ref_out, ref = run
    out = tmp_path / "cat"
    cmd = [sys.executable, str(DREAMBOOTH_SCRIPT), *DB_TRAIN, "--output_dir", str(out), "--report_to", "none", "--no_register"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        deadline = time.time() + 300
        while not common.list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "training_args.json").exists()  # it really died mid-training
    last = common.list_checkpoints(out)[-1]
    assert last[0] < 10
    (out / "checkpoint-99").mkdir()  # decoys: neither may be picked as "latest"
    (out / "checkpoint-100.tmp").mkdir()
    res = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                         env=subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming from checkpoint {last[1]} at step {last[0]}" in res.stderr
    summary = json.loads((out / "training_args.json").read_text())["summary"]
    assert summary["resumed_from"] == str(last[1]) and summary["global_step"] == 10
    # optimizer, scheduler, data order, noise: everything replays, so the adapter is bit-identical
    assert summary["adapter_sha256_per_rank"] == ref["adapter_sha256_per_rank"]
    assert summary["final_loss"] == ref["final_loss"]


# ---- precision, prior preservation, DDP ----------------------------------------------------------------------------
def test_bf16_prior_preservation_snr(tmp_path):
    argv = [*DB_BASE, "--output_dir", str(tmp_path / "dog"), "--mixed_precision", "bf16", "--max_train_steps", "2",
            "--train_batch_size", "1", "--lr_warmup_steps", "0", "--seed", "1", "--report_to", "none",
            "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a cat",
            "--num_class_images", "2", "--class_inference_steps", "2", "--sample_batch_size", "2",
            "--snr_gamma", "5.0", "--adapter", "spectral_r", "--checkpointing_steps", "1"]
    reset_accelerate()
    try:
        args = db.parse_args(argv)
        accelerator, ctx = db.setup(args)
        unet = accelerator.unwrap_model(ctx.models.unet)
        assert unet.conv_in.weight.dtype == torch.bfloat16 and ctx.models.vae.encoder.conv_in.weight.dtype == torch.bfloat16
        trainable = [p for p in unet.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert len(list((tmp_path / "class").glob("*.jpg"))) == 2  # generated because missing
        db.train(args, accelerator, ctx)
        assert ctx.global_step == 2 and torch.isfinite(torch.tensor(ctx.last_loss))
        opt_state = ctx.optimizer.state_dict()["state"]
        assert opt_state and all(s["exp_avg"].dtype == torch.float32 for s in opt_state.values())
    finally:
        reset_accelerate()


def test_fp16_flag_is_validated():
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="fp16 without a GPU"):
            args = db.parse_args(["--mixed_precision", "fp16"])
    else:
        args = db.parse_args(["--mixed_precision", "fp16"])
    assert args.mixed_precision == "fp16"
    with pytest.raises(SystemExit):
        db.parse_args(["--mixed_precision", "fp8"])


@pytest.mark.ddp
def test_ddp_two_cpu_processes_end_with_the_same_adapter(tmp_path):
    out = tmp_path / "cat"
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")  # accelerate: gloo DDP on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(DREAMBOOTH_SCRIPT), *DB_BASE,
           "--output_dir", str(out), "--max_train_steps", "3", "--train_batch_size", "1", "--lr_warmup_steps", "0",
           "--seed", "0", "--report_to", "none", "--no_register", "--checkpointing_steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "training_args.json").read_text())["summary"]
    assert summary["num_processes"] == 2
    hashes = summary["adapter_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] == saved_adapter_hash(out, ("unet",))
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")} == \
        {"random_states_0.pkl", "random_states_1.pkl"}  # each rank's RNG is checkpointed


# ---- bad inputs fail before training -----------------------------------------------------------------------------
def _bad_inputs(tmp_path, case, concepts):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ok.txt").write_text("not an image, ignored")
    (broken / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return {
        "empty": (["--instance_data_dir", str(empty), "--instance_prompt", "a sks dog"], "contains no images"),
        "unreadable": (["--instance_data_dir", str(broken), "--instance_prompt", "a sks dog"], "photo.png cannot be read"),
        "rank": (["--rank", "40"], "has only 32"),
        "overlap": (["--concepts_dir", str(concepts), "--band", "0", "--concept_name", "dog"],
                    r"overlaps concepts registered .*'cat' \(columns \[0, 1, 2, 3\]\).*next free band: 1"),
    }[case]


@pytest.mark.parametrize("case", ["empty", "unreadable", "rank", "overlap"])
def test_bad_inputs_fail_before_training(run, tmp_path, case):
    argv, message = _bad_inputs(tmp_path, case, run[0].parent)
    out = tmp_path / "out"
    with pytest.raises(db.InputError, match=message):
        run_dreambooth(argv + ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "1",
                         "--checkpointing_steps", "1"])
    assert not common.list_checkpoints(out) and not (out / "training_args.json").exists()


def test_bad_flag_combinations():
    for argv in (["--with_prior_preservation", "--instance_data_dir", "/some/dir"], ["--band", "x"], ["--rank", "0"],
                 ["--instance_data_dir", "/some/dir", "--caption_column", "none"], ["--adapter", "nope"], ["--adapter_options", "{bad"]):
        with pytest.raises(SystemExit):
            db.parse_args(argv)


# ---- diffusers' flag set (issue 17) -------------------------------------------------------------------------------
def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = db.parse_args(DB_BASE + ["--push_to_hub", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    with pytest.raises(db.InputError, match="--push_to_hub: the Hugging Face Hub is switched off here.*huggingface-cli"):
        db.setup(args)
    assert not (tmp_path / "o").exists()  # nothing started


def test_launch_warning_for_cpu_num_processes(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --num_processes 2 --cpu` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "runs ONE process" in db.launch_warning(1) and "--multi_gpu" in db.launch_warning(1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real 2-process launch
    assert db.launch_warning(1) is None
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.delenv("WORLD_SIZE")
    assert db.launch_warning(1) is None  # plain `python script.py`


def test_diffusers_flags_run_and_push(tmp_path, monkeypatch, capsys):
    """--pre_compute_text_embeddings gives exactly the text encoder's loss; the other flags are accepted; the
    upload happens at the end with the folder and repo id (Hub client stubbed: no network here)."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)))
    out = tmp_path / "flags"
    argv = [*DB_BASE, "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2", "--lr_warmup_steps",
            "0", "--seed", "0", "--report_to", "none", "--no_register", "--checkpointing_steps", "5",
            "--pre_compute_text_embeddings", "--text_encoder_use_attention_mask", "--set_grads_to_none",
            "--enable_xformers_memory_efficient_attention", "--image_interpolation_mode", "lanczos", "--push_to_hub"]
    reset_accelerate()
    try:
        args = db.parse_args(argv)
        accelerator, ctx = db.setup(args)
        batch = db.collate_fn([ctx.dataset[(i, 0)] for i in range(2)])
        assert batch["prompt_embeds"].shape == (2, 77, 32)  # (B, L, D): encoded once, before training
        m = ctx.models
        losses = []
        for b in (batch, {k: v for k, v in batch.items() if k != "prompt_embeds"}):
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                losses.append(db.compute_loss(args, b, m.unet, m.text_encoder, m.vae, m.noise_scheduler,
                                              ctx.weight_dtype, g))
        assert torch.equal(losses[0], losses[1])
        db.train(args, accelerator, ctx)
        assert ctx.global_step == 2
    finally:
        reset_accelerate()
    summary = run_dreambooth(argv[len(DB_BASE):] + ["--overwrite_output_dir"])
    assert summary["global_step"] == 2
    assert calls[0] == ("create", "me/flags") and calls[1][1]["folder_path"] == str(out)
    assert "checkpoint-*" in calls[1][1]["ignore_patterns"]
    assert "Uploaded to https://huggingface.co/me/flags" in capsys.readouterr().out


# ---- the benchmark's worker (same step, both adapters) ---------------------------------------------------------
def test_benchmark_worker_runs_both_variants():
    import dreambooth_vs_peft as bench  # benchmarks/ is on pytest's pythonpath

    threads = torch.get_num_threads()
    results = {}
    try:
        for variant in bench.VARIANTS:
            reset_accelerate()
            results[variant] = bench.worker(bench.parse_args(["--steps", "1", "--warmup", "0", "--worker", variant]))
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
    spectral, lora = results["spectral"], results["peft_lora"]
    # Spectral Adapter^A and LoRA have r(out+in) trainable weights per layer: equal-parameter comparison
    assert spectral["trainable"] == lora["trainable"] == 9984
    for r in results.values():
        assert r["median_step_s"] > 0 and r["train_peak_bytes"] > 0 and r["resolution"] == 32
