"""Tokenizers (core/tokenizer.py): the trained byte-level BPE, HF tokenizer.json files, the uint32 corpus cache,
and byte counts for bits per byte whatever the tokenizer."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.config import DataConfig, from_dict
from core.data import Corpus, trained_bpe
from core.errors import UserError
from core.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer, tokenizer_vocab_size, train_bpe

FIX = Path(__file__).resolve().parent / "fixtures" / "hf"
TEXTS = [
    "def add(a, b):\n    return a + b\n\n# naïve café — ünïcödé ✓ 日本語\n" * 3,
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n" * 4,
    "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(name, file=sys.stderr)\n" * 3,
    "<|eos|> a special's text is plain text here, and so is <|bos|>\n\t\r\n \x00\x7f end",
]


@pytest.fixture
def sources(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for i, t in enumerate(TEXTS * 3):
        (d / f"f{i:02d}.py").write_text(t, encoding="utf-8")
    return DataConfig(sources=(str(d / "*.py"),), val_fraction=0.3, cache_dir=str(tmp_path / "cache"),
                      tokenizer="bpe:320")


def test_bpe_training_is_deterministic_and_round_trips_any_text(tmp_path):
    a, b = train_bpe(TEXTS, 320), train_bpe(list(TEXTS), 320)
    assert a == b
    (tmp_path / "t.json").write_text(a)
    tok = BPETokenizer(tmp_path / "t.json")
    assert tok.vocab_size == 320 and (tok.bos_id, tok.eos_id, tok.pad_id) == (317, 318, 319)
    assert tok.bytes_per_id[[317, 318, 319]].tolist() == [0, 0, 0]
    rng = np.random.default_rng(0)
    samples = TEXTS + ["", "x", "".join(chr(int(c)) for c in rng.integers(1, 0x2FFF, 300)), "<|eos|><|pad|>"]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.n_bytes(ids).sum()) == len(text.encode("utf-8"))  # bits per byte divide by these
        assert not set(ids.tolist()) & {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1]) / 2  # it did learn merges


def test_trained_bpe_is_cached_and_keyed_like_the_corpus(sources):
    tok = get_tokenizer(sources)
    assert tok.vocab_size == 320 and tok.name.startswith("bpe-")
    cached = list(Path(sources.cache_dir).glob("bpe-*/tokenizer.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert trained_bpe(sources, 320).name == tok.name and cached[0].stat().st_mtime_ns == mtime  # not retrained
    other = trained_bpe(dataclasses.replace(sources, tokenizer="bpe:300"), 300)
    assert other.vocab_size == 300 and len(list(Path(sources.cache_dir).glob("bpe-*"))) == 2
    with pytest.raises(UserError, match="pass the data config"):
        get_tokenizer("bpe:320")


def test_bits_per_byte_counts_the_same_bytes_with_bytes_and_bpe(sources):
    """The bytes counted for the validation split (the divisor of bits per byte) are the text's bytes, whether
    the corpus was tokenized into bytes or into BPE ids."""
    bpe = get_tokenizer(sources)
    byte = ByteTokenizer()
    c_bpe = Corpus.open(sources, bpe)
    c_byte = Corpus.open(dataclasses.replace(sources, tokenizer="byte"), byte)
    assert len(c_bpe.val) < len(c_byte.val)
    for split in ("train", "val"):
        nb = int(bpe.n_bytes(np.asarray(getattr(c_bpe, split))).sum())
        assert nb == int(byte.n_bytes(np.asarray(getattr(c_byte, split))).sum())
    assert c_bpe.train.dtype == np.uint16 and c_bpe.key != c_byte.key


class WideTokenizer(ByteTokenizer):
    """Bytes shifted past 65,535: a vocabulary that needs the uint32 cache."""

    name = "wide-test"
    vocab_size = 70_003
    bos_id, eos_id, pad_id = 70_000, 70_001, 70_002
    bytes_per_id = np.array([0] * 69_000 + [1] * 256 + [0] * 747, np.int32)

    def encode(self, text):
        return super().encode(text) + 69_000


def test_corpus_cache_stores_uint32_for_large_vocabularies(sources):
    data = dataclasses.replace(sources, tokenizer="byte")
    corpus = Corpus.open(data, WideTokenizer())
    assert corpus.train.dtype == np.uint32 and corpus.meta["dtype"] == "uint32"
    assert int(corpus.train.max()) == 70_001 and int(np.asarray(corpus.train).min()) >= 69_000
    again = Corpus.open(data, WideTokenizer())  # read back from the cache
    np.testing.assert_array_equal(np.asarray(again.val), np.asarray(corpus.val))


def test_hf_tokenizer_json(tmp_path):
    tok = get_tokenizer(f"hf:{FIX / 'llama'}")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (300, 0, 1, 1)  # from tokenizer_config.json
    assert tok.bytes_per_id[:2].tolist() == [0, 0] and tok.byte_level
    assert get_tokenizer(f"hf:{FIX / 'llama' / 'tokenizer.json'}").name == tok.name
    q = get_tokenizer(f"hf:{FIX / 'qwen2'}")  # no bos_token: bos falls back to eos
    assert q.bos_id == q.eos_id == 0
    text = "for _ in range(n):\n    a, b = b, a + b  # ✓"
    ids = tok.encode(text.encode("utf-8"))
    assert tok.decode(ids) == text and int(tok.n_bytes(ids).sum()) == len(text.encode())
    # a config naming an HF tokenizer is checked against the model's vocabulary
    with pytest.raises(UserError, match="model.vocab_size 259 < vocabulary 300"):
        from_dict({"model": {"arch": "decoder"}, "data": {"tokenizer": f"hf:{FIX / 'llama'}"}}, "x")
    assert tokenizer_vocab_size("bpe:4096") == 4096
    for bad, match in (("hf:/nonexistent/dir", "no tokenizer.json"), ("bpe:12", "at least 259"),
                       ("sentencepiece", "valid: byte, hf:PATH")):
        with pytest.raises(UserError, match=match):
            get_tokenizer(bad)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        get_tokenizer(f"hf:{broken}")


def test_sentencepiece_style_byte_counts(tmp_path):
    """A Metaspace vocabulary with byte fallback (Llama 2 style): '▁' is a space, <0xNN> one byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁a": 4, "b": 5, "▁é": 6}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(f"hf:{tmp_path}")
    assert tok.bytes_per_id.tolist() == [0, 0, 0, 1, 2, 1, 3]
    assert (tok.bos_id, tok.eos_id) == (1, 2) and not tok.byte_level
