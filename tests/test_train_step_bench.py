"""Smoke tests of benchmarks/train_step.py on the CPU (tiny zoo models; the GPU run is benchmarks/gpu_check.sh)."""
import json

import pytest

import train_step


def _run(tmp_path, *argv):
    args = train_step.parse_args(["--device", "cpu", "--warmup", "0", "--steps", "1", "--out", str(tmp_path), *argv])
    return args, train_step.main(args)


def test_every_variant_in_one_run_with_ratios(tmp_path):
    args, res = _run(tmp_path, "--model", "tiny_vit")
    eager = res["runs"]["eager"]
    expected = {"floor", "full", "peft_lora", *train_step.METHODS}
    assert set(eager) == expected
    for v, s in eager.items():
        assert s["step_ms"] > 0 and s["x_lora"] == pytest.approx(s["step_ms"] / eager["peft_lora"]["step_ms"])
        assert s["x_floor"] == pytest.approx(s["step_ms"] / eager["floor"]["step_ms"])
        assert s["peak_mib"] is None  # CPU: no CUDA allocator statistics
    assert eager["floor"]["trainable"] == 0 and eager["full"]["trainable"] > eager["peft_lora"]["trainable"] > 0
    assert eager["spectral_a"]["trainable"] == eager["peft_lora"]["trainable"]  # r (out + in) per layer, both
    assert 0 < res["merged_inference"]["ratio"]
    stem = tmp_path / "train_step_tiny_vit_cpu_fp32"
    assert json.loads(stem.with_suffix(".json").read_text())["runs"]["eager"].keys() == eager.keys()
    md = stem.with_suffix(".md").read_text()
    assert "| spectral_r |" in md and "x PEFT LoRA" in md and "merged spectral_a inference" in md


def test_sd_unet_family_and_bad_arguments(tmp_path):
    _, res = _run(tmp_path, "--model", "tiny_unet", "--methods", "spectral_r", "--no_full", "--dtype", "bf16",
                  "--forms", "weight")
    assert set(res["runs"]["eager"]) == {"floor", "peft_lora", "spectral_r", "spectral_r:weight"}
    assert res["meta"]["dtype"] == "bf16" and res["meta"]["rank"] == 2
    with pytest.raises(SystemExit):
        train_step.parse_args(["--methods", "nope"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--steps", "0"])


def test_sd15_config_is_the_real_one():
    """The SD1.5 UNet config written out in code: 4 levels (320..1280), 2 layers per block, 768-d text."""
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config  # noqa: F841  (the class exists in the installed diffusers)
    c = train_step.SD15_UNET
    assert c["block_out_channels"] == (320, 640, 1280, 1280) and c["cross_attention_dim"] == 768
    assert c["layers_per_block"] == 2 and c["attention_head_dim"] == 8 and c["sample_size"] == 64


@pytest.mark.slow
def test_compile_and_checkpointing_runs(tmp_path):
    _, res = _run(tmp_path, "--model", "tiny_vit", "--methods", "spectral_r", "spectral_a", "--no_full",
                  "--runs", "eager", "compile", "--compile_backend", "aot_eager", "--grad_ckpt", "--tag", "_c")
    assert set(res["runs"]["compile"]) == {"floor", "peft_lora", "spectral_a", "spectral_r"}
    assert res["meta"]["grad_ckpt"]


def test_time_budget_skips_variants(tmp_path):
    _, res = _run(tmp_path, "--model", "tiny_vit", "--methods", "spectral_a", "--no_full", "--time_budget", "1e-9")
    assert all(s == {"skipped": "time budget"} for s in res["runs"]["eager"].values())
    assert "merged_inference" not in res
