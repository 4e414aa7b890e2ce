"""DreamBooth inputs on the offline bases: the built-in tokenizer and instance images, per-image captions
(issue 15) and the main job, a built-in digit concept (script runs and faults: test_dreambooth.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DB_BASE, reset_accelerate, run_dreambooth
from training import dreambooth_spectral as db

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
    argv = [*DB_BASE, "--instance_data_dir", str(inst), "--instance_prompt", "a sks thing", "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "3", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "none", "--no_register", "--with_prior_preservation", "--class_data_dir",
            str(tmp_path / "class"), "--num_class_images", "4", "--class_inference_steps", "1", "--resolution", "32"]
    args = db.parse_args(argv)
    inputs = db.prepare_inputs(args)
    assert inputs.instance_captions == ["a handwritten digit 1 sks", "a handwritten digit 2 sks", "a sks thing"]
    assert inputs.class_prompts == ["a handwritten digit 1", "a handwritten digit 2"]
    summary = run_dreambooth(argv[len(DB_BASE):])
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
    args = db.parse_args([*DB_BASE, "--instance_data_dir", str(folder), "--output_dir", str(tmp_path / "o"), *extra])
    with pytest.raises(db.InputError, match=message):
        db.prepare_inputs(args)


# ---- the main job: a built-in digit concept (issue 15) --------------------------------------------------------------
@pytest.mark.slow  # materialises builtin:digits and the digit set in the test's own cache (~40 s on 2 free cores)
def test_digit_concept_main_job(tmp_path, capsys):
    """builtin:digits-bold: per-image captions with the digit, a class set, a grid whose top row is exactly
    the untouched base for the same prompts and seeds, and the next commands."""
    from PIL import Image

    from training import digit_concepts as dc

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
    from training.common import step_seed

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
