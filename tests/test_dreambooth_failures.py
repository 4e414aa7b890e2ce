"""DreamBooth under bad input and faults (issue 14): no non-finite save, no overwritten run, no foreign resume,
bad numbers refused, 16-bit PNGs, stale temp files, file modes, a full band folder. Tiny-sd base, 32 px."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import DB_BASE, run_dreambooth
from training import common
from training import dreambooth_spectral as db

FAST = [*DB_BASE, "--max_train_steps", "2", "--train_batch_size", "1", "--lr_warmup_steps", "0", "--seed", "0",
        "--report_to", "none", "--checkpointing_steps", "1", "--lora_export"]


@pytest.mark.parametrize("flags", [["--learning_rate", "-1"], ["--learning_rate", "0"], ["--learning_rate", "nan"],
                                   ["--learning_rate", "inf"], ["--text_encoder_lr", "-1"],
                                   ["--max_grad_norm", "nan"], ["--max_grad_norm", "-1"], ["--snr_gamma", "nan"],
                                   ["--adam_beta2", "1.5"], ["--prior_loss_weight", "inf"]])
def test_bad_numbers_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        db.parse_args(DB_BASE + flags)
    assert f"{flags[0]} must be" in capsys.readouterr().err


def test_absurd_batch_size_is_refused(tmp_path):
    args = db.parse_args(DB_BASE + ["--train_batch_size", "100000", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(db.InputError, match=r"--train_batch_size 100000 is larger than the dataset \(4 examples\)"):
        db.prepare_inputs(args)


def test_16_bit_png_keeps_its_gray_level(tmp_path):
    from PIL import Image

    a = np.full((8, 8), 32768, np.uint16)  # mid gray in 16 bits
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    ds = db.DreamBoothDataset([tmp_path / "g16.png"], {"prompt_ids": torch.zeros(3)}, 8, center_crop=True)
    x = ds[(0, 0)]["instance_images"]  # (3, 8, 8) in [-1, 1]
    assert torch.allclose(x, torch.full_like(x, 128 / 255 * 2 - 1), atol=1e-6)  # round(32768 / 257) = 128, not clipped to 255


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 2-step run with a checkpoint per step, into concepts/cat."""
    out = tmp_path_factory.mktemp("concepts") / "cat"
    summary = run_dreambooth(FAST + ["--output_dir", str(out)])
    return out, summary


def test_diverging_run_stops_without_saving_non_finite_tensors(tmp_path):
    out = tmp_path / "hot"
    with pytest.raises(db.TrainingDiverged, match=r"diverged at step (\d+).*last good checkpoint is .*checkpoint-\d+"
                       r"|diverged at step 1: .*no earlier checkpoint") as e:
        run_dreambooth(FAST + ["--output_dir", str(out), "--learning_rate", "1e30", "--max_train_steps", "4",
                         "--no_register"])
    step = int(str(e.value).split("diverged at step ")[1].split(":")[0])
    ckpts = common.list_checkpoints(out)
    assert [s for s, _ in ckpts] == list(range(1, step))  # nothing saved for the diverged step
    for _, path in ckpts:
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "unet" / "adapter_model.safetensors")).values())
    assert not (out / "unet").exists() and not (out / "training_args.json").exists()


def test_output_dir_of_another_run_is_refused(first_run, tmp_path):
    out, _ = first_run
    before = (out / "unet" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(db.InputError, match=r"holds a different run \(.*learning_rate: 0.0005 -> 0.001.*"
                                            r"--overwrite_output_dir"):
        run_dreambooth(FAST + ["--output_dir", str(out), "--learning_rate", "1e-3"])
    assert (out / "unet" / "adapter_model.safetensors").read_bytes() == before  # untouched
    # resuming another run's checkpoint (here: from another folder) is refused as well
    with pytest.raises(db.InputError, match=r"checkpoint .*checkpoint-2 was made by a different run \(.*rank: 4 -> 2"):
        run_dreambooth(FAST + ["--output_dir", str(tmp_path / "other"), "--rank", "2", "--no_register",
                         "--resume_from_checkpoint", str(out / "checkpoint-2")])


def test_same_run_cleans_stale_temp_files_and_writes_0644(first_run):
    out, first = first_run
    stale = [out / ".README.md.x1y2.tmp", out / "unet" / ".adapter_model.safetensors.ab.tmp"]
    for p in stale:
        p.write_bytes(b"")  # what a kill during the final save leaves
    summary = run_dreambooth(FAST + ["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--max_train_steps", "3"])
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 3
    assert not any(p.exists() for p in stale)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.stat().st_size > 0 for p in files), [p for p in files if not p.stat().st_size]
    assert not [p for p in files if p.name.endswith(".tmp")]
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o644}
    assert not wrong  # users share output folders: 0644 like any tool's output, never mkstemp's 0600
    recorded = json.loads((out / db.RUN_CONFIG).read_text())
    assert recorded["config"]["learning_rate"] == 5e-4 and len(recorded["config"]["instance_data_sha256"]) == 64


def test_overwrite_output_dir_replaces_the_other_run(first_run):
    out, _ = first_run
    summary = run_dreambooth(FAST + ["--output_dir", str(out), "--learning_rate", "1e-3", "--overwrite_output_dir",
                               "--resume_from_checkpoint", "latest", "--max_train_steps", "1"])
    assert summary["resumed_from"] is None and summary["global_step"] == 1  # the other run's checkpoints are gone
    assert [s for s, _ in common.list_checkpoints(out)] == [1]
    assert json.loads((out / db.RUN_CONFIG).read_text())["config"]["learning_rate"] == 1e-3


def test_full_band_folder_is_named(tmp_path):
    from spectral_vision.bands import BandRegistry

    reg = BandRegistry(tmp_path)  # tiny-sd's smallest adapted layer has 32 singular values: 2 bands at rank 16
    for i, name in enumerate(["a", "b"]):
        reg.register(name, tmp_path / name, "spectral_a", 16, band=i)
    with pytest.raises(db.InputError, match=r"all 2 bands of this folder .* are taken at rank 16"):
        run_dreambooth(FAST + ["--output_dir", str(tmp_path / "c"), "--rank", "16"])
    assert set(reg.concepts()) == {"a", "b"} and not common.list_checkpoints(tmp_path / "c")
