"""transformers integration: Trainer, accelerate, gradient checkpointing, bf16, saving, task heads."""
import json
import os

import pytest
import torch

import spectral_vision as sv
from spectral_vision.integrations import transformers as svt
from spectral_vision.zoo import create_model

from helpers import perturb


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def build(name, seed=0):
    if name == "tiny-bert":
        return tiny_bert(seed)
    kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if name == "tiny-gpt2" else {}
    return create_model(name, seed=seed, **kw)


def batch(name, n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = 128 if name == "tiny-bert" else 256
    ids = torch.randint(1, vocab, (n, t), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g) if name == "tiny-bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


MODELS = ["tiny-llama", "tiny-gpt2", "tiny-bert"]


def test_default_presets_and_heads():
    assert svt.default_target_modules(create_model("tiny-llama")) == "llama"
    assert svt.default_target_modules(create_model("tiny-gpt2")) == "gpt2"
    assert svt.default_target_modules(tiny_bert()) == "bert"
    assert svt.head_modules(tiny_bert()) == ["classifier"]
    with pytest.raises(ValueError, match="no target preset"):
        svt.default_target_modules(create_model("tiny-clip-text"))


@pytest.mark.parametrize("name", MODELS)
def test_trainer_two_steps_saves_adapter_only_and_reloads(name, tmp_path):
    from transformers import TrainingArguments

    model = svt.prepare_model_for_training(build(name), method="spectral_a", rank=2)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    b = batch(name, n=8)
    ds = [{k: v[i] for k, v in b.items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_steps=2, logging_steps=1, disable_tqdm=True)
    out = svt.SpectralTrainer(model=model, args=args, train_dataset=ds).train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    assert any(not torch.equal(p, train_before[n]) for n, p in model.named_parameters() if n in train_before)
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert ("modules_to_save.safetensors" in files) == (name == "tiny-bert")
    # a fresh base + the saved folder gives the trained model's outputs
    model.eval()
    fresh = svt.load_pretrained(build(name), ckpt)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=b["input_ids"]).logits, model(input_ids=b["input_ids"]).logits)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_same_loss_and_grads(name, reentrant):
    results = []
    for gc in (False, True):
        model = svt.prepare_model_for_training(build(name), method="spectral_a", rank=2, gradient_checkpointing=gc,
                                               gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        perturb(model)
        model.train()
        loss = model(**batch(name)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if gc:
            inner = getattr(model, "model", None) or getattr(model, "transformer", None) or model.bert
            assert inner.gradient_checkpointing
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and any(g.abs().sum() > 0 for g in g0.values())
    adapter_grads = [n for n in g0 if ".adapters." in n]
    assert adapter_grads and all(g1[n].abs().sum() > 0 for n in adapter_grads)  # reached the checkpointed blocks
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_and_bf16_base(name):
    model = svt.prepare_model_for_training(build(name), method="spectral_a", rank=2)
    perturb(model)
    b = batch(name)
    ref = model(**b).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**b).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())
    ad = [p for n, p in model.named_parameters() if ".adapters." in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in ad)
    assert any(p.grad.abs().sum() > 0 for p in ad)
    # a bf16 base: adapters stay fp32, forward runs in bf16, gradients reach the adapters
    m16 = build(name).to(torch.bfloat16)
    svt.prepare_model_for_training(m16, method="spectral_a", rank=2)
    perturb(m16)
    out = m16(**b)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    ad = [p for n, p in m16.named_parameters() if ".adapters." in n]
    assert all(p.dtype == torch.float32 for p in ad) and any(p.grad.abs().sum() > 0 for p in ad)


def test_trainer_bf16_and_accelerate_step(tmp_path):
    from accelerate import Accelerator
    from transformers import TrainingArguments

    model = svt.prepare_model_for_training(build("tiny-llama"), method="spectral_r", rank=2, gradient_checkpointing=True)
    b = batch("tiny-llama", n=8)
    ds = [{k: v[i] for k, v in b.items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4, bf16=True,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    assert svt.SpectralTrainer(model=model, args=args, train_dataset=ds).train().global_step == 2
    from accelerate.state import AcceleratorState

    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        model2 = svt.prepare_model_for_training(build("tiny-gpt2"), method="lora", rank=2)
        opt = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
        model2, opt = acc.prepare(model2, opt)
        before = {n: p.detach().clone() for n, p in model2.named_parameters() if p.requires_grad}
        with acc.autocast():
            loss = model2(**batch("tiny-gpt2")).loss
        acc.backward(loss)
        opt.step()
    finally:
        AcceleratorState._reset_state(True)  # the state is a process-wide singleton: leave none behind
    assert any(not torch.equal(p, before[n]) for n, p in model2.named_parameters() if p.requires_grad)
    out = svt.save_pretrained(acc.unwrap_model(model2), tmp_path / "lora")  # PEFT baseline: trainable tensors
    fresh = svt.prepare_model_for_training(build("tiny-gpt2"), method="lora", rank=2)
    svt.load_adapter_state(fresh, out)
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, dict(acc.unwrap_model(model2).named_parameters())[n])
    assert json.loads((out / "adapter_meta.json").read_text())["model_class"] == "GPT2LMHeadModel"


def test_roberta_head_saved_whole_not_adapted_and_reloads_exactly_under_another_rng_state(tmp_path):
    """Issue 18.4: the new classifier.dense must not be adapted (its basis is a random init): trained and
    saved whole, so a reload under another RNG state (another head init, as in another process) gives the
    same logits bit for bit."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    cfg = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "base")  # the "pretrained" body
    torch.manual_seed(1)
    model = RobertaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    svt.prepare_model_for_training(model, method="spectral_a", rank=2)
    adapted = [n for n, _ in sv.spectral_layers(model)]
    assert len(adapted) == 12 and not any(n.startswith("classifier") for n in adapted)
    assert type(model.classifier.dense) is torch.nn.Linear and model.classifier.dense.weight.requires_grad
    perturb(model)  # adapters and the head move away from their init, as after training
    model.eval()
    ids = torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out = svt.save_pretrained(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    heads = load_file(str(out / "modules_to_save.safetensors"))
    assert sorted(heads) == sorted(f"classifier.{k}" for k in model.classifier.state_dict())
    assert torch.equal(heads["classifier.dense.weight"], model.classifier.dense.weight)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert not any(n.startswith("classifier") for n in meta["layers"])
    torch.manual_seed(7)  # another RNG state: the new head is initialised differently
    fresh = RobertaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    assert not torch.equal(fresh.classifier.dense.weight, model.classifier.dense.weight)
    svt.load_pretrained(fresh, out).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, logits)
    # an incomplete heads file is refused, not half-loaded onto a random head
    from safetensors.torch import save_file

    save_file({k: v for k, v in heads.items() if "out_proj" not in k}, str(out / "modules_to_save.safetensors"))
    with pytest.raises(ValueError, match="lacks.*classifier.out_proj"):
        svt.load_pretrained(RobertaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3), out)


def test_newly_initialised_pooler_is_saved_whole_via_missing_keys(tmp_path):
    """A BERT checkpoint without a pooler: BertForSequenceClassification initialises bert.pooler.dense at
    random. Passed as missing_keys, it is trained and saved whole, so a reload under another RNG state is
    exact; left frozen (the control), the reload silently differs."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "base")
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))

    def run(use_missing, seed):
        torch.manual_seed(seed)
        model, info = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                                      output_loading_info=True)
        return model, sorted(info["missing_keys"])

    results = {}
    for use_missing in (True, False):
        model, missing = run(use_missing, 1)
        assert "bert.pooler.dense.weight" in missing
        svt.prepare_model_for_training(model, method="spectral_a", rank=2,
                                       missing_keys=missing if use_missing else None)
        heads = model.spectral_vision_modules_to_save
        assert heads == (["classifier", "bert.pooler.dense"] if use_missing else ["classifier"])
        assert model.bert.pooler.dense.weight.requires_grad == use_missing
        perturb(model)
        model.eval()
        out = svt.save_pretrained(model, tmp_path / f"adapter-{use_missing}")
        fresh, _ = run(use_missing, 7)
        svt.load_pretrained(fresh, out).eval()
        with torch.no_grad():
            results[use_missing] = torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert results == {True: True, False: False}


def test_spectral_trainer_resume_matches_uninterrupted_run(tmp_path):
    from transformers import TrainingArguments

    b = batch("tiny-llama", n=8)
    ds = [{k: v[i] for k, v in b.items()} for i in range(8)]

    def trainer(out, model):
        args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                 use_cpu=True, report_to=[], save_steps=1, disable_tqdm=True, seed=0)
        return svt.SpectralTrainer(model=model, args=args, train_dataset=ds)

    full = svt.prepare_model_for_training(build("tiny-llama"), method="spectral_a", rank=2)
    trainer(tmp_path / "a", full).train()
    resumed = svt.prepare_model_for_training(build("tiny-llama"), method="spectral_a", rank=2)
    trainer(tmp_path / "a", resumed).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    trained = [n for n, p in full.named_parameters() if p.requires_grad]
    got = dict(resumed.named_parameters())
    assert trained and all(torch.allclose(got[n], p) for n, p in full.named_parameters() if p.requires_grad)
