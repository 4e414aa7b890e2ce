"""Presets of the common transformers encoders/decoders, on tiny random configs of the real architectures.

Each preset must match exactly the attention and MLP projections of every block: no embedding, relative-
position projection, pooler, classification head or lm_head. The expected names are spelled out here
independently of the preset regexes.
"""
import warnings

import pytest
import torch
from torch import nn

import spectral_vision as sv
from spectral_vision.integrations import transformers as svt
from spectral_vision.layers import layer_kind
from spectral_vision.presets import MODEL_TYPE_PRESETS, PRESETS, default_preset, match_targets

L = 2  # layers: checks that every block index is matched
ENC = dict(vocab_size=64, hidden_size=16, num_hidden_layers=L, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=32)
DEC = dict(vocab_size=64, hidden_size=16, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1,
           intermediate_size=32, max_position_embeddings=32)


def _bert_names(prefix):
    return [f"{prefix}encoder.layer.{i}.{m}" for i in range(L) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]


def _llama_names(prefix):
    return [f"{prefix}layers.{i}.{m}" for i in range(L) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def build(arch):
    """``(model, expected adapted names)`` for a tiny random model of ``arch`` (no download)."""
    import transformers as T

    torch.manual_seed(0)
    if arch == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**ENC, num_labels=3)), _bert_names("bert.")
    if arch == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**ENC, num_labels=3)), _bert_names("roberta.")
    if arch == "mpnet":
        names = [f"mpnet.encoder.layer.{i}.{m}" for i in range(L) for m in (
            "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
            "intermediate.dense", "output.dense")]
        return T.MPNetForSequenceClassification(T.MPNetConfig(**ENC, num_labels=3)), names
    if arch == "deberta_v2":  # relative attention with separate position projections and a ContextPooler head
        cfg = T.DebertaV2Config(**ENC, num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                share_att_key=False, max_relative_positions=16, position_buckets=8)
        names = [f"deberta.encoder.layer.{i}.{m}" for i in range(L) for m in (
            "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
            "attention.output.dense", "intermediate.dense", "output.dense")]
        return T.DebertaV2ForSequenceClassification(cfg), names
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**DEC)), _llama_names("model.")
    if arch == "mistral":
        return T.MistralForSequenceClassification(T.MistralConfig(**DEC, num_labels=3, pad_token_id=0)), _llama_names("model.")
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**DEC)), _llama_names("model.")
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_embd=16, n_layer=L, n_head=2, n_positions=32, num_labels=3, pad_token_id=0)
        names = [f"transformer.h.{i}.{m}" for i in range(L) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
        return T.GPT2ForSequenceClassification(cfg), names
    if arch == "t5":  # gated MLP (wi_0, wi_1), decoder cross-attention
        cfg = T.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=L, num_heads=2,
                         feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        attn = ("q", "k", "v", "o")
        names = [f"encoder.block.{i}.layer.0.SelfAttention.{a}" for i in range(L) for a in attn]
        names += [f"encoder.block.{i}.layer.1.DenseReluDense.{w}" for i in range(L) for w in ("wi_0", "wi_1", "wo")]
        names += [f"decoder.block.{i}.layer.0.SelfAttention.{a}" for i in range(L) for a in attn]
        names += [f"decoder.block.{i}.layer.1.EncDecAttention.{a}" for i in range(L) for a in attn]
        names += [f"decoder.block.{i}.layer.2.DenseReluDense.{w}" for i in range(L) for w in ("wi_0", "wi_1", "wo")]
        return T.T5ForConditionalGeneration(cfg), names
    raise KeyError(arch)


ARCHS = ["bert", "roberta", "mpnet", "deberta_v2", "llama", "mistral", "qwen2", "gpt2", "t5"]


def _inputs(model):
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.model_type == "t5":
        kw["decoder_input_ids"] = ids[:, :4]
    return kw


@pytest.mark.parametrize("arch", ARCHS)
def test_preset_matches_exactly_the_block_projections(arch):
    model, expected = build(arch)
    preset = default_preset(model)
    assert preset == arch
    got = match_targets(model, preset, supported=lambda m: layer_kind(m) is not None)
    assert sorted(got) == sorted(expected)
    assert len(set(got)) == len(got) == len(expected)
    # the same preset seen by PEFT (regex full match on the same names) selects the same layers
    import re

    assert sorted(n for n, m in model.named_modules() if layer_kind(m) is not None
                  and re.fullmatch(PRESETS[preset]["regex"], n)) == sorted(expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_preset_attach_is_exact_at_init(arch):
    """``target_modules="auto"`` attaches the model type's preset; zero-init ^A gives the base outputs."""
    model, expected = build(arch)
    model.eval()
    kw = _inputs(model)
    with torch.no_grad():
        ref = model(**kw).logits
    sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=2, target_modules="auto"), progress=False)
    assert sorted(n for n, _ in sv.spectral_layers(model)) == sorted(expected)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref, rtol=0, atol=1e-6)


def test_model_type_table_and_unknown_type():
    for arch in ARCHS:
        model, _ = build(arch)
        assert MODEL_TYPE_PRESETS[model.config.model_type] == arch
        assert svt.default_target_modules(model) == arch
    with pytest.raises(ValueError, match="no target preset for model_type 'clip_text_model'"):
        from spectral_vision.zoo import create_model

        default_preset(create_model("tiny-clip-text"))
    with pytest.raises(ValueError, match="no target preset for model_type None"):
        default_preset(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["roberta", "deberta_v2", "gpt2"])
def test_heads_never_adapted_even_when_targets_match_them(arch):
    """A regex that also matches the head: the head stays a plain module, trained whole, with a warning."""
    model, expected = build(arch)
    heads = svt.head_modules(model)
    assert heads and set(heads) <= {"classifier", "pooler", "score"}
    everything = r".*"
    with pytest.warns(UserWarning, match="inside the task head"):
        svt.prepare_model_for_training(model, method="spectral_a", rank=2, target_modules=everything)
    adapted = [n for n, _ in sv.spectral_layers(model)]
    assert adapted and not any(n.split(".")[0] in heads for n in adapted)
    for h in heads:
        head = model.get_submodule(h)
        assert not any(isinstance(m, sv.SpectralLayer) for m in head.modules())
        assert all(p.requires_grad for p in head.parameters())
    # with the default preset nothing is excluded, so nothing is warned about
    model, _ = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svt.prepare_model_for_training(model, method="spectral_a", rank=2)
    assert sorted(n for n, _ in sv.spectral_layers(model)) == sorted(expected)


def test_heads_excluded_for_peft_baselines_too():
    model, expected = build("roberta")
    with pytest.warns(UserWarning, match="inside the task head"):
        svt.prepare_model_for_training(model, method="lora", rank=2, target_modules=r".*(dense|query|out_proj)")
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert tuned and not any(n.startswith("classifier") for n in tuned)
    assert all(p.requires_grad for p in model.classifier.parameters())


@pytest.mark.parametrize("user_exclude", [["query"], r".*\.query", "bert"])
def test_head_exclusion_keeps_the_users_exclude(user_exclude):
    model, expected = build("roberta")
    kw = dict(method="spectral_a", rank=2, target_modules=r".*(dense|query|key)", exclude_modules=user_exclude)
    if user_exclude == "bert":  # a preset as exclude: the blocks are excluded, the head too -> nothing left
        with pytest.raises(ValueError, match="matched no adaptable layer"):
            svt.prepare_model_for_training(model, **kw)
        assert not list(sv.spectral_layers(model))
        return
    with pytest.warns(UserWarning, match="classifier"):
        svt.prepare_model_for_training(model, **kw)
    adapted = {n for n, _ in sv.spectral_layers(model)}
    assert adapted == {n for n in expected if n.endswith(("dense", "key"))}
