"""DreamBooth script on the offline builtin:tiny-sd (32 px): run, replay after SIGKILL, LoRA export, DDP, bad inputs."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spectral_vision.adapter_file import SIG_PREFIX

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "dreambooth_spectral.py"
import common  # noqa: E402  (training/ and benchmarks/ come from pytest's pythonpath)
import dreambooth_spectral as db  # noqa: E402

# the random-weight tiny base (the script's default is the trained builtin:digits)
BASE = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", "builtin:chelsea"]
# the same run everywhere (in process, killed + resumed, ...): text encoder too, accumulation, flips, warmup
TRAIN = [*BASE, "--max_train_steps", "10", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
         "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
         "--lr_warmup_steps", "2", "--seed", "0", "--band", "0", "--train_text_encoder", "--random_flip"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(argv):
    reset_accelerate()
    try:
        return db.main(db.parse_args(BASE + argv))  # a later --pretrained_model_name_or_path wins
    finally:
        reset_accelerate()


def env_for_subprocess():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def saved_hash(out: Path, components=("text_encoder", "unet")) -> str:
    """``adapter_hash`` recomputed from the saved adapter folders."""
    h = hashlib.sha256()
    for comp in components:
        tensors = load_file(str(out / comp / "adapter_model.safetensors"))
        for k in sorted(tensors):
            if k.startswith(SIG_PREFIX):  # the basis signature beside the adapter's own tensors
                continue
            h.update(f"{comp}.{k}".encode())
            h.update(tensors[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


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
            summary = run_main(TRAIN + ["--output_dir", str(concepts / "cat"), "--validation_prompt", "a sks cat",
                                        "--num_validation_images", "1", "--validation_inference_steps", "2",
                                        "--validation_epochs", "1", "--report_to", "tensorboard"])
        finally:
            torch.set_num_threads(threads)
    return concepts / "cat", summary


# ---- the built-in base -----------------------------------------------------------------------------------------
def test_builtin_tokenizer_is_clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    from spectral_vision.integrations.diffusers import resolve_pretrained

    tok = CLIPTokenizer.from_pretrained(resolve_pretrained("builtin:tiny-sd"), subfolder="tokenizer")
    ref = SimpleTokenizer()
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    for text in ["a photo of sks dog", "A Cat, sitting on the mat!", "astronaut riding a horse 1234"]:
        assert tok(text).input_ids == [49406] + ref.encode(text) + [49407]
    assert tok.convert_tokens_to_ids(["a</w>", "photo</w>"]) == [320, 1125]  # CLIP's well-known ids


def test_bundled_instance_images(tmp_path):
    from PIL import Image
    from spectral_vision.integrations.diffusers import bundled_instance_images

    folder = bundled_instance_images("chelsea,coffee", tmp_path / "inst", views=3)
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{n}_{i}.png" for n in ("chelsea", "coffee") for i in range(3)]
    sizes = [Image.open(f).size for f in files]
    assert all(w == h for w, h in sizes) and sizes[0] == (300, 300)  # chelsea is 300x451
    with pytest.raises(ValueError, match="available"):
        bundled_instance_images("lena", tmp_path / "x")


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
    assert summary["adapter_sha256_per_rank"] == [saved_hash(out)]
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
    cmd = [sys.executable, str(SCRIPT), *TRAIN, "--output_dir", str(out), "--report_to", "none", "--no_register"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_for_subprocess())
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
                         env=env_for_subprocess(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming from checkpoint {last[1]} at step {last[0]}" in res.stderr
    summary = json.loads((out / "training_args.json").read_text())["summary"]
    assert summary["resumed_from"] == str(last[1]) and summary["global_step"] == 10
    # optimizer, scheduler, data order, noise: everything replays, so the adapter is bit-identical
    assert summary["adapter_sha256_per_rank"] == ref["adapter_sha256_per_rank"]
    assert summary["final_loss"] == ref["final_loss"]


# ---- precision, prior preservation, DDP ----------------------------------------------------------------------------
def test_bf16_prior_preservation_snr(tmp_path):
    argv = [*BASE, "--output_dir", str(tmp_path / "dog"), "--mixed_precision", "bf16", "--max_train_steps", "2",
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
    env = dict(env_for_subprocess(), ACCELERATE_USE_CPU="1")  # accelerate: gloo DDP on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *BASE,
           "--output_dir", str(out), "--max_train_steps", "3", "--train_batch_size", "1", "--lr_warmup_steps", "0",
           "--seed", "0", "--report_to", "none", "--no_register", "--checkpointing_steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "training_args.json").read_text())["summary"]
    assert summary["num_processes"] == 2
    hashes = summary["adapter_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] == saved_hash(out, ("unet",))
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
        run_main(argv + ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "1",
                         "--checkpointing_steps", "1"])
    assert not common.list_checkpoints(out) and not (out / "training_args.json").exists()


def test_bad_flag_combinations():
    for argv in (["--with_prior_preservation", "--instance_data_dir", "/some/dir"], ["--band", "x"], ["--rank", "0"],
                 ["--instance_data_dir", "/some/dir", "--caption_column", "none"], ["--adapter", "nope"], ["--adapter_options", "{bad"]):
        with pytest.raises(SystemExit):
            db.parse_args(argv)


# ---- per-image captions (issue 15) ----------------------------------------------------------------------------------
def _captioned_folder(folder: Path, rows: list, txt: dict = None, images=("a.png", "b.png", "c.png")) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(images):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in (txt or {}).items():
        (folder / name).write_text(text)
    return folder


def test_per_image_captions_reach_the_batches(tmp_path):
    """metadata.jsonl column > <image>.txt > --instance_prompt; every item carries its own image's caption;
    prior preservation generates class images for the per-image class prompts and captions them."""
    from spectral_vision.integrations.diffusers import resolve_pretrained
    from transformers import CLIPTokenizer

    inst = _captioned_folder(tmp_path / "inst", [
        {"file_name": "a.png", "text": "a handwritten digit 1 sks", "class_prompt": "a handwritten digit 1"},
        {"file_name": "b.png", "class_prompt": "a handwritten digit 2"}], txt={"b.txt": "a handwritten digit 2 sks\n"})
    argv = [*BASE, "--instance_data_dir", str(inst), "--instance_prompt", "a sks thing", "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "3", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "none", "--no_register", "--with_prior_preservation", "--class_data_dir",
            str(tmp_path / "class"), "--num_class_images", "4", "--class_inference_steps", "1", "--resolution", "32"]
    args = db.parse_args(argv)
    inputs = db.prepare_inputs(args)
    assert inputs.instance_captions == ["a handwritten digit 1 sks", "a handwritten digit 2 sks", "a sks thing"]
    assert inputs.class_prompts == ["a handwritten digit 1", "a handwritten digit 2"]
    summary = run_main(argv[len(BASE):])
    assert summary["global_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "class" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == ["a handwritten digit 1"] * 2 + ["a handwritten digit 2"] * 2
    assert all((tmp_path / "class" / r["file_name"]).is_file() for r in rows)
    # the dataset hands every image its own tokenized caption (instance and class)
    tok = CLIPTokenizer.from_pretrained(resolve_pretrained("builtin:tiny-sd"), subfolder="tokenizer")
    ds = db.make_dataset(args, tok, inputs)
    captions = {r["file_name"]: r["text"] for r in rows}
    for i in range(len(ds)):
        item = ds[(i, 0)]
        assert torch.equal(item["instance_prompt_ids"], db.tokenize(tok, inputs.instance_captions[i % 3]))
        assert torch.equal(item["class_prompt_ids"], db.tokenize(tok, captions[ds.class_images[i % 4].name]))
    batch = db.collate_fn([ds[(i, 0)] for i in range(3)])
    assert batch["input_ids"].shape == (6, 77) and not torch.equal(batch["input_ids"][0], batch["input_ids"][1])


@pytest.mark.parametrize("case", ["column", "uncaptioned", "escape", "json", "dup"])
def test_bad_captions_are_refused(tmp_path, case):
    rows, extra, message = {
        "column": ([{"file_name": "a.png", "prompt": "x"}], [], r"no column 'text' \(columns: \['prompt'\]\)"),
        "uncaptioned": ([{"file_name": "a.png", "text": "x"}], [], r"2 instance image\(s\) have no caption \(b.png, c.png"),
        "escape": ([{"file_name": "../a.png", "text": "x"}], [], "is not a file of"),
        "json": (["{bad"], [], "line 1 is not JSON"),
        "dup": ([{"file_name": "a.png", "text": "x"}, {"file_name": "./a.png", "text": "y"}], [], "appears twice"),
    }[case]
    folder = tmp_path / "inst"
    _captioned_folder(folder, [])
    (folder / "metadata.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    args = db.parse_args([*BASE, "--instance_data_dir", str(folder), "--output_dir", str(tmp_path / "o"), *extra])
    with pytest.raises(db.InputError, match=message):
        db.prepare_inputs(args)


# ---- diffusers' flag set (issue 17) -------------------------------------------------------------------------------
def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = db.parse_args(BASE + ["--push_to_hub", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
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
    argv = [*BASE, "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2", "--lr_warmup_steps",
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
    summary = run_main(argv[len(BASE):] + ["--overwrite_output_dir"])
    assert summary["global_step"] == 2
    assert calls[0] == ("create", "me/flags") and calls[1][1]["folder_path"] == str(out)
    assert "checkpoint-*" in calls[1][1]["ignore_patterns"]
    assert "Uploaded to https://huggingface.co/me/flags" in capsys.readouterr().out


# ---- the main job: a built-in digit concept (issue 15) --------------------------------------------------------------
@pytest.mark.slow  # materialises builtin:digits and the digit set in the test's own cache (~40 s on 2 free cores)
def test_digit_concept_main_job(tmp_path, capsys):
    """builtin:digits-bold: per-image captions with the digit, a class set, a grid whose top row is exactly
    the untouched base for the same prompts and seeds, and the next commands."""
    import digit_concepts as dc
    from PIL import Image

    if not hasattr(dc, "InstanceSet"):
        pytest.skip("needs training/digit_concepts.py with write_instance_set(concept, folder) (concepts branch)")
    out = tmp_path / "concepts" / "bold"
    argv = ["--instance_data_dir", "builtin:digits-bold", "--output_dir", str(out), "--max_train_steps", "1",
            "--train_batch_size", "2", "--with_prior_preservation", "--num_class_images", "4", "--seed", "0",
            "--validation_inference_steps", "1", "--report_to", "none", "--lr_warmup_steps", "0", "--lora_export"]
    reset_accelerate()
    try:
        args = db.parse_args(argv)
        inputs = db.prepare_inputs(args)
        assert inputs.instance_captions[:3] == [dc.concept_prompt(["bold"], d) for d in range(3)]
        assert args.validation_prompt.split("|") == [dc.concept_prompt(["bold"], d) for d in range(10)]
        db.main(db.parse_args(argv))
    finally:
        reset_accelerate()
    printed = capsys.readouterr().out
    assert "python -m fusion --base builtin:digits --adapters" in printed and "python -m demos.fusion_app" in printed
    grid = np.asarray(Image.open(out / db.GRID))
    assert grid.shape == (64, 320, 3)  # 2 rows (base, concept) x 10 digits, 32 px
    from spectral_vision.integrations.diffusers import load_pipeline
    from diffusers import DPMSolverMultistepScheduler
    from common import step_seed

    pipe = load_pipeline("builtin:digits")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    digits = [0, 1, 2, 3]  # the first batch of --sample_batch_size (default 4) validation images
    gens = [torch.Generator().manual_seed(step_seed(0, 11, d, 0)) for d in digits]
    base = pipe([dc.concept_prompt(["bold"], d) for d in digits], num_inference_steps=1, height=32, width=32,
                generator=gens).images
    for d, im in zip(digits, base):
        assert np.array_equal(grid[:32, 32 * d:32 * (d + 1)], np.asarray(im))
    assert not np.array_equal(grid[:32], grid[32:])  # the concept row differs


# ---- the benchmark's worker (same step, both adapters) ---------------------------------------------------------
def test_benchmark_worker_runs_both_variants():
    import dreambooth_vs_peft as bench

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
