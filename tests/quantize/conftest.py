"""Fixtures: the tiny HF checkpoint with a small trained tokenizer, calibration files, FP8 checkpoints (made once)."""

import json
import random
import shutil

import pytest

pytest.importorskip("modelopt", reason="FP8 calibration needs nvidia-modelopt (pip install 'trtfalcon[quant]')")

WORDS = ("the model reads a state and writes tokens while every layer mixes attention with a scan over time "
         "falcon hybrid mamba cache block slot kernel engine batch scale weight input output").split()


def _sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(n)]


def save_tokenizer(directory, vocab_size=200):
    """A word-piece BPE trained on WORDS, small enough for the tiny model's 256-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(_sentences(200, 1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tok_hf(tiny_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-tok") / "hf"
    shutil.copytree(tiny_hf, d)
    save_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(16, 2)))
    return p


@pytest.fixture(scope="session")
def fp8_hf(tok_hf, calib_jsonl, tmp_path_factory):
    """ModelOpt FP8 checkpoint of the tiny model, calibrated on text (12 samples, 4 held out), with accuracy.json."""
    from trtfalcon.quantize.fp8 import quantize_fp8

    out = tmp_path_factory.mktemp("fp8") / "fp8"
    quantize_fp8(tok_hf, out, calib_data=calib_jsonl, calib_size=12, calib_seq_len=48, holdout=4)
    return out


@pytest.fixture(scope="session")
def fp8_kv_hf(tiny_hf, tmp_path_factory):
    """FP8 weights + FP8 KV cache, synthetic calibration ids, no accuracy report."""
    from trtfalcon.quantize.fp8 import quantize_fp8

    out = tmp_path_factory.mktemp("fp8kv") / "fp8kv"
    quantize_fp8(tiny_hf, out, kv_cache_dtype="fp8", calib_size=4, calib_seq_len=32, accuracy=False)
    return out
