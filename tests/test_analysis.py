"""Spectral analysis: exact answers on constructed cases, and the CLI on tiny models."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import spectral_vision as sv
from spectral_vision import analysis
from spectral_vision.zoo import create_model
from helpers import perturb


def _orthonormal(n, m, seed):
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (n, m)


def test_constructed_amplify_and_rotate():
    """Amplify the top 3 singular values by 1.5 and rotate u_0 (angle θ) and v_1 (angle φ) out of the span:
    the tool must report exactly cos θ, cos φ, +50 % and nothing else."""
    out_f, in_f, n = 40, 30, 24
    Q, P = _orthonormal(out_f, n + 1, 0), _orthonormal(in_f, n + 1, 1)
    U, V = Q[:, :n].clone(), P[:, :n].clone()
    s = torch.linspace(10, 1, n, dtype=torch.float64)  # well separated
    W0 = (U * s) @ V.T
    theta, phi = 0.7, 0.4
    U1, V1 = U.clone(), V.clone()
    U1[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * Q[:, n]  # still orthonormal: Q[:, n] ⟂ span(U)
    V1[:, 1] = math.cos(phi) * V[:, 1] + math.sin(phi) * P[:, n]
    s1 = s.clone()
    s1[:3] *= 1.5
    W1 = (U1 * s1) @ V1.T
    rec = analysis.compare_weights(W0.float(), W1.float(), "layer", k=8)
    cos_u, cos_v, rel = map(torch.tensor, (rec["cos_u"], rec["cos_v"], rec["rel_change"]))
    exp_u, exp_v, exp_rel = torch.ones(8), torch.ones(8), torch.zeros(8)
    exp_u[0], exp_v[1], exp_rel[:3] = math.cos(theta), math.cos(phi), 0.5
    torch.testing.assert_close(cos_u, exp_u, atol=1e-5, rtol=0)
    torch.testing.assert_close(cos_v, exp_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(rel, exp_rel, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(rec["sigma_tuned"][:n]), s1.float(), atol=1e-4, rtol=1e-5)
    assert rec["shape"] == [40, 30] and len(rec["sigma_base"]) == 30  # all min(out, in) values
    assert abs(rec["delta_rel_fro"] - float((W1 - W0).norm() / W0.norm())) < 1e-5


def test_power_law_alpha_recovered():
    n = 64
    for alpha in (0.5, 1.2):
        S = 10.0 * torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
        W = (_orthonormal(80, n, 2) * S) @ _orthonormal(n, n, 3).T  # σ_i = 10 i^{-α} exactly
        rec = analysis.compare_weights(W.float(), W.float(), k=4)
        assert abs(rec["alpha_base"] - alpha) < 1e-3 and rec["fit_range"] == [1, 32]
        assert max(abs(c - 1) for c in rec["cos_u"] + rec["cos_v"]) < 1e-4 and max(map(abs, rec["rel_change"])) < 1e-5
    # only the fit range counts: a different tail beyond ⌈n/2⌉ does not move α
    S = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    S2 = S.clone()
    S2[40:] *= 0.01
    assert abs(analysis.power_law_alpha(S) - analysis.power_law_alpha(S2)) < 1e-12
    assert abs(analysis.power_law_alpha(S2, fit_fraction=1.0) - 1.0) > 0.1


def test_effective_rank():
    assert analysis.effective_rank(torch.ones(10)) == pytest.approx(10.0)
    assert analysis.effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert analysis.effective_rank(p * 7) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


@pytest.mark.slow
def test_module_with_attached_adapter_and_conv():
    """An adapted (unmerged) model counts with its adapter; merged gives the same; conv as (out, cin*kh*kw)."""
    base = create_model("tiny-unet")
    tuned = create_model("tiny-unet")
    sv.attach(tuned, sv.SpectralConfig(method="spectral_a", rank=2, target_modules="sd_unet_conv"), progress=False)
    perturb(tuned, std=0.05)
    recs = {r["name"]: r for r in analysis.analyze(base, tuned, targets="sd_unet_conv", k=4, progress=False)}
    conv = recs["down_blocks.0.resnets.0.conv1"]
    assert conv["shape"] == [32, 32 * 9] and conv["delta_rel_fro"] > 1e-3
    sv.merge(tuned)
    merged = {r["name"]: r for r in analysis.analyze(base, tuned, targets="sd_unet_conv", k=4, progress=False)}
    assert merged["down_blocks.0.resnets.0.conv1"]["sigma_tuned"] == pytest.approx(conv["sigma_tuned"], rel=1e-5)
    untouched = {r["name"]: r for r in analysis.analyze(base, tuned, targets=r".*conv_in", progress=False)}
    assert untouched["conv_in"]["delta_rel_fro"] == 0.0


@pytest.mark.slow
def test_cli_adapter_folder_and_state_dict(tmp_path, capsys):
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(method="spectral_r", rank=2, target_modules="timm_vit"), progress=False)
    perturb(model, std=0.3)
    sv.save_adapter(model, tmp_path / "adapter")
    assert analysis.main(["zoo:tiny-vit", str(tmp_path / "adapter"), "--out", str(tmp_path / "figs"), "--k", "8"]) == 0
    records = json.loads((tmp_path / "figs" / "analysis.json").read_text())
    by = {r["name"]: r for r in records}
    assert "blocks.0.attn.qkv" in by and "head" in by and "patch_embed.proj" in by
    assert by["head"]["delta_rel_fro"] == 0.0 and by["head"]["cos_u"] == pytest.approx([1.0] * 8, abs=1e-5)
    qkv = by["blocks.0.attn.qkv"]
    assert qkv["delta_rel_fro"] > 1e-3
    # ^R rotates within the top-2 band: the spectrum outside it is unchanged, the top-2 vectors move
    assert qkv["cos_u"][2:] == pytest.approx([1.0] * 6, abs=1e-4)
    assert min(qkv["cos_u"][:2] + qkv["cos_v"][:2]) < 0.999
    for f in ("analysis.json", "analysis.csv", "spectra.png", "cosine.png", "sigma_change.png", "alpha.png"):
        assert (tmp_path / "figs" / f).stat().st_size > 0
    out = capsys.readouterr().out
    assert "layers compared" in out and out.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 'figs'}")

    # the same tuned weights as a plain safetensors state dict (merged), and a module vs state-dict pair
    sv.merge_and_unload(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    again = analysis.analyze("zoo:tiny-vit", tmp_path / "tuned.safetensors", targets="timm_vit", k=8, progress=False)
    assert {r["name"] for r in again} == {n for n in by if n.startswith("blocks.")}
    assert {r["name"]: r["cos_u"] for r in again}["blocks.0.attn.qkv"] == pytest.approx(qkv["cos_u"], abs=1e-4)


def test_gpt2_conv1d_module_vs_state_dict_layout():
    """Module (Conv1D transposed to (out, in)) vs its own state dict ((in, out)): one layout, no change found."""
    model = create_model("tiny-gpt2")
    recs = analysis.analyze(model, dict(model.state_dict()), targets="gpt2", k=4, progress=False)
    assert recs and all(r["delta_rel_fro"] == 0.0 for r in recs)
    assert all(min(r["cos_u"] + r["cos_v"]) > 0.9999 for r in recs)


def test_plot_spectrum_and_errors(tmp_path):
    fig = analysis.plot_spectrum({"before": torch.linspace(5, 1, 16), "after": [6.0] + [1.0] * 15},
                                 title="x", path=tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and len(fig.axes[0].lines) == 2
    with pytest.raises(ValueError, match="shape"):
        analysis.compare_weights(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(FileNotFoundError):
        analysis.analyze("zoo:tiny-vit", tmp_path / "missing")


def test_cli_exit_status_like_a_unix_tool(tmp_path, capsys):
    """`spectral-analysis` (console script = sys.exit(main())): 0 and a 'wrote' line on success; 1 and one line
    on stderr on failure (it used to exit 1 after succeeding, dumping every record to stderr)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=2, target_modules="timm_vit"), progress=False)
    perturb(model, std=0.3)
    sv.save_adapter(model, tmp_path / "adapter")
    root = str(Path(__file__).resolve().parents[1])
    console_script = "import sys; from spectral_vision.analysis import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", console_script, "zoo:tiny-vit", str(tmp_path / "adapter"),
                           "--out", str(tmp_path / "figs"), "--no-figures", "--k", "4", "--targets", r"blocks\.0\..*"],
                          capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (f"wrote {tmp_path / 'figs' / 'analysis.json'}, "
                                                    f"{tmp_path / 'figs' / 'analysis.csv'}")
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 4000  # a progress bar at most

    for argv, msg in ((["zoo:tiny-vit", str(tmp_path / "nothing")], "nothing: no such file or folder"),
                      (["zoo:tiny-vit", str(tmp_path / "adapter"), "--layers", "nope", "--targets",
                        r"blocks\.0\.attn\.qkv", "--k", "2"], "layers ['nope'] are not")):
        assert analysis.main([*argv, "--out", str(tmp_path / "f2")]) == 1
        err = capsys.readouterr().err.splitlines()[-1]  # (after a progress bar, if any)
        assert err.startswith("spectral-analysis: error: ") and msg in err, err


@pytest.mark.slow  # builds builtin:digits and attaches to its UNet + text encoder
def test_builtin_digits_against_a_concept_folder(tmp_path, capsys):
    """A DreamBooth concept folder (unet/ + text_encoder/ adapters) analysed against builtin:digits."""
    from spectral_vision.integrations.diffusers import load_pipeline

    pipe = load_pipeline("builtin:digits")
    concept = tmp_path / "concepts" / "bold"
    for comp, preset in (("unet", "sd_unet"), ("text_encoder", "clip_text")):
        m = getattr(pipe, comp)
        sv.attach(m, sv.SpectralConfig(method="spectral_a", rank=2, target_modules=preset), progress=False)
        perturb(m, std=0.2)
        sv.save_adapter(m, concept / comp)
    few = ["--targets", r".*(attn1\.to_q|self_attn\.q_proj|conv_in)", "--k", "4", "--no-figures"]  # keep it fast
    assert analysis.main(["builtin:digits", str(concept), "--out", str(tmp_path / "figs"), *few]) == 0
    recs = {r["name"]: r for r in json.loads((tmp_path / "figs" / "analysis.json").read_text())}
    unet = [n for n in recs if n.startswith("unet.")]
    te = [n for n in recs if n.startswith("text_encoder.")]
    assert unet and te and len(unet) + len(te) == len(recs)
    assert "unet.conv_in" in recs
    moved = {n for n, r in recs.items() if r["delta_rel_fro"] > 1e-4}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in moved
    assert any(n.startswith("text_encoder.") and n.endswith("self_attn.q_proj") for n in moved)
    assert all(recs[n]["delta_rel_fro"] == 0.0 for n in recs if n.endswith("conv_in"))  # not adapted
    # one bare adapter folder: found on the component it belongs to
    assert analysis.main(["builtin:digits", str(concept / "text_encoder"), "--out", str(tmp_path / "f2"), *few]) == 0
    assert all(r["name"].startswith("text_encoder.")
               for r in json.loads((tmp_path / "f2" / "analysis.json").read_text()))
    assert "wrote" in capsys.readouterr().out
