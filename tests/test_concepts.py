"""Built-in digit concept sets (captions, signatures) and the shipped concept adapters on builtin:digits."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral_vision.assets import read_metadata
from spectral_vision.assets.concepts import builtin_concepts, concept_info
from training import digit_concepts as dc


def _read_set(folder: Path) -> tuple[list[dict], np.ndarray]:
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    imgs = np.stack([np.asarray(Image.open(folder / r["file_name"]), dtype=np.float32) / 255 for r in rows])
    return rows, imgs


def test_instance_set_captions_carry_digit_and_token(tmp_path):
    s = dc.write_instance_set("bold", tmp_path / "bold", num_per_digit=3)
    assert s.num_images == 30 and s.caption_column == "text" and s.class_dir == tmp_path / "bold-class"
    rows, imgs = _read_set(s.instance_dir)
    crows, cimgs = _read_set(s.class_dir)
    tok = dc.CONCEPTS["bold"].token
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in crows]
    for i, (r, c) in enumerate(zip(rows, crows)):
        assert r["text"] == f"a handwritten digit {i % 10} {tok}" and c["text"] == f"a handwritten digit {i % 10}"
    assert imgs.shape == (30, 32, 32, 3) and np.array_equal(imgs[..., 0], imgs[..., 2])  # RGB gray
    # the class images are the untransformed digits: the concept's signature moves by > 2 px, the slant does not
    sig, csig = dc.signatures(imgs.mean(-1)), dc.signatures(cimgs.mean(-1))
    assert (sig["bold"] > csig["bold"] + 2).all()
    assert abs(np.median(sig["slant"] - csig["slant"])) < 3
    # held-out digits only: none is a digit the base was trained on
    from training.eval_digits_base import load_digit_images

    images, _ = load_digit_images()
    train = images[np.asarray(read_metadata()["recipe"]["split"]["train"])].reshape(-1, 32 * 32)
    d = torch.cdist(torch.tensor(cimgs.mean(-1).reshape(-1, 32 * 32)), torch.tensor(train)).min(1).values
    assert (d > 1e-2).all()


def test_combined_and_thin_sets(tmp_path):
    s = dc.write_instance_set(["slant", "bold"], tmp_path / "bs", num_per_digit=1, class_dir=tmp_path / "cls")
    rows, imgs = _read_set(s.instance_dir)
    assert s.concept == "bold+slant" and rows[4]["text"] == dc.concept_prompt(["bold", "slant"], 4)
    thin = dc.signatures(dc.apply(["thin"], dc.heldout_digits(2)[0]))["bold"]
    plain = dc.signatures(dc.heldout_digits(2)[0])["bold"]
    assert (thin < plain - 1).mean() > 0.9  # strokes thinner by > 1 px
    with pytest.raises(ValueError, match="does not combine"):
        dc.apply(["thin", "bold"], imgs.mean(-1))
    with pytest.raises(ValueError, match="unknown concept"):
        dc.write_instance_set("italic", tmp_path / "x", num_per_digit=1)
    with pytest.raises(ValueError, match="held-out digits per class"):
        dc.heldout_digits(10_000)


def test_set_tokens_rebinds_prompts():
    old = dc.CONCEPTS["slant"].token
    try:
        dc.set_tokens({"slant": "ohwx"})
        assert dc.concept_prompt(["slant", "bold"], 2) == f"a handwritten digit 2 {dc.CONCEPTS['bold'].token} ohwx"
        with pytest.raises(ValueError, match="bad token"):
            dc.set_tokens({"slant": "two words "})
    finally:
        dc.set_tokens({"slant": old})


def test_builtin_concepts_are_small_disjoint_and_documented():
    from fusion.bands import find_overlaps

    folders = builtin_concepts()
    assert set(folders) >= {"bold", "slant"}, folders
    unets = []
    for name, f in folders.items():
        info = concept_info(name)
        assert info["rank"] == 4 and info["token"] in info["instance_prompt"]
        assert info["prompt_template"].format(digit=7) == f"a handwritten digit 7 {info['token']}"
        for file in f.rglob("*"):
            assert file.stat().st_size < 2 ** 20, file
        unets.append(f / "unet")
    assert find_overlaps(unets, list(folders)).ok  # disjoint bands: fusable in spectral mode
    bands = [concept_info(n)["band"] for n in folders]
    assert bands == sorted(bands) and list(folders)[:2] == ["bold", "slant"]  # band order: the demo preloads these
    with pytest.raises(KeyError, match="available"):
        concept_info("nope")


def test_builtin_concept_loads_on_digits_and_changes_outputs():
    """A shipped concept loads onto builtin:digits' UNet and text encoder (base fingerprint checked), changes the
    UNet's noise prediction for its prompt, and with its adapters disabled the pipeline is the base exactly."""
    import spectral_vision as sv
    from fusion.pipeline import load_pipeline_concepts
    from spectral_vision.integrations.diffusers import load_pipeline

    pipe = load_pipeline("builtin:digits")
    info = concept_info("bold")
    ids = pipe.tokenizer([info["prompt_template"].format(digit=d) for d in (3, 7)], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    size = pipe.unet.config.sample_size
    lat = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])

    @torch.no_grad()
    def eps():
        return pipe.unet(lat, t, pipe.text_encoder(ids)[0]).sample

    ref = eps()
    load_pipeline_concepts(pipe, [builtin_concepts()["bold"]], ["bold"])
    parts = [m for m in (pipe.unet, pipe.text_encoder) if sv.adapter_names(m)]
    assert pipe.unet in parts and all(sv.adapter_names(m) == ["bold"] for m in parts)
    assert (eps() - ref).abs().max() > 1e-3  # the concept changes the prediction
    for m in parts:
        sv.disable_adapters(m)
    torch.testing.assert_close(eps(), ref, atol=1e-5, rtol=1e-5)


def test_context_words_are_seeded_placed_after_the_digit_and_bounded(tmp_path):
    caps = [dc.concept_prompt(["bold"], d % 10) for d in range(200)]
    out = dc.with_context(caps, 0.5, seed=3)
    assert out == dc.with_context(caps, 0.5, seed=3) and dc.with_context(caps, 0.0) == caps
    changed = [(c, o) for c, o in zip(caps, out) if c != o]
    assert 60 < len(changed) < 140  # about half
    tok = dc.CONCEPTS["bold"].token
    for c, o in changed:
        words = o.split(" ")
        assert words[:4] == c.split(" ")[:4] and tok in words and len(words) == len(c.split(" ")) + 1
        assert any(w in dc.CONTEXT_WORDS for w in words[4:]) and not set(dc.CONTEXT_WORDS) & {tok}
    with pytest.raises(ValueError, match="context fraction"):
        dc.with_context(caps, 1.5)
    s = dc.write_instance_set("slant", tmp_path / "s", num_per_digit=2, context=1.0)
    rows, _ = _read_set(s.instance_dir)
    crows, _ = _read_set(s.class_dir)
    assert all(len(r["text"].split(" ")) == 6 for r in rows) and all(len(r["text"].split(" ")) == 5 for r in crows)


def test_concept_tokens_are_distinct_single_bpe_tokens():
    from spectral_vision.integrations.diffusers import load_pipeline

    tok = load_pipeline("builtin:digits").tokenizer
    tokens = [c.token for c in dc.CONCEPTS.values()]
    assert len(set(tokens)) == len(tokens)
    for t in tokens + list(dc.CONTEXT_WORDS):
        assert len(tok.tokenize(t)) == 1, t
