"""The offline Qwen tokenizer (pipelines.testing.tokenizer) against tiktoken on the same ranks."""
from __future__ import annotations

import importlib.util
import json
import shutil
import unicodedata

import pytest

pytest.importorskip("dashscope", reason="the Qwen BPE ranks ship in dashscope")
tiktoken = pytest.importorskip("tiktoken")
transformers = pytest.importorskip("transformers")

from pipelines.testing import tokenizer as qtok  # noqa: E402

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)

PROMPTS = [
    "A cat sitting on a red sofa, photorealistic, 4k",
    "一只猫坐在红色的沙发上，照片级真实感。",
    "宫崎骏风格的动漫插画：少女站在向日葵田里 🌻🌞，远处是蓝天白云",
    "Emoji 😀🐱‍👤👩🏽‍🚀🏳️‍🌈 and flags 🇯🇵🇫🇷!",
    "Digits 1234567890, 3.14159, 2025-07-31, $1,000,000 and ١٢٣ and ４５６",
    "Mixed   whitespace\tand\ttabs\n\nnew lines\r\nCRLF   \n  trailing   ",
    "I'll say it's DON'T WE'VE they'd you're I'M",
    "Café naïve résumé Ångström — “quotes” ‘single’ … «guillemets»",
    "日本語のテキストと한국어 텍스트, العربية, русский текст, ελληνικά",
    "def f(x):\n    return x ** 2  # comment\n\n\n\tif x>=0 && y!=1: pass",
    "    leading spaces and a very long run of spaces" + " " * 40 + "end",
    "A sign that says \"Qwen-Image\" in neon letters, <b>bold</b>, 100% sure?!...",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return qtok.build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def reference():
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qtok.qwen_tiktoken_path()))
    return tiktoken.Encoding(
        "qwen2_reference",
        pat_str=qtok.PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=dict(qtok.SPECIAL_TOKEN_IDS),
    )


def test_folder_files_and_config(tokenizer_dir, hf_tokenizer):
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json"}
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 151387
    assert type(hf_tokenizer).__name__.startswith("Qwen2Tokenizer")
    assert len(hf_tokenizer) == 151665
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == 151645
    assert hf_tokenizer.pad_token == "<|endoftext|>" and hf_tokenizer.pad_token_id == 151643
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer.model_max_length == 131072


def test_special_token_ids(hf_tokenizer):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
        "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
        "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
        "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663,
        "<|file_sep|>": 151664,
    }
    assert qtok.SPECIAL_TOKEN_IDS == expected
    for token, token_id in expected.items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == token_id
        # never split, whatever surrounds it
        assert hf_tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"][1] == token_id


def test_template_prefix_is_34_tokens(hf_tokenizer, reference):
    prefix = TEMPLATE[: TEMPLATE.index("{}")]
    ids = hf_tokenizer(prefix)["input_ids"]
    assert len(ids) == 34
    assert ids == reference.encode(prefix, allowed_special="all")
    assert ids[0] == 151644 and ids[29] == 151645 and ids[31] == 151644
    # the prefix tokenises the same way inside every templated prompt (the pipeline drops 34)
    for prompt in PROMPTS:
        assert hf_tokenizer(TEMPLATE.format(prompt))["input_ids"][:34] == ids


@pytest.mark.parametrize("text", PROMPTS + [TEMPLATE.format(p) for p in PROMPTS[:4]])
def test_same_ids_as_tiktoken(hf_tokenizer, reference, text):
    assert unicodedata.is_normalized("NFC", text)  # the HF tokenizer NFC-normalises, tiktoken not
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text, allowed_special="all")
    assert hf_tokenizer.decode(ids) == text
    assert reference.decode(ids) == text


def test_every_vocab_token_is_reached_by_the_merges(hf_tokenizer, tokenizer_dir):
    model = hf_tokenizer.backend_tokenizer.model
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    wrong = [(s, i) for s, i in vocab.items() if [t.id for t in model.tokenize(s)] != [i]]
    assert not wrong, wrong[:10]


def test_padding_batch(hf_tokenizer):
    texts = [TEMPLATE.format(PROMPTS[0]), TEMPLATE.format(PROMPTS[1])]
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    short = lengths.index(min(lengths))
    assert batch["input_ids"][short, -1].item() == 151643  # right padding with <|endoftext|>


def test_loads_from_vocab_and_merges_without_tokenizer_json(tokenizer_dir, hf_tokenizer, tmp_path):
    # The hub folder may carry only vocab.json + merges.txt: the result must not change.
    from transformers import AutoTokenizer

    for p in tokenizer_dir.iterdir():
        if p.name != "tokenizer.json":
            shutil.copy(p, tmp_path / p.name)
    slow_path = AutoTokenizer.from_pretrained(tmp_path)
    for text in PROMPTS + [TEMPLATE.format(PROMPTS[2])]:
        assert slow_path(text)["input_ids"] == hf_tokenizer(text)["input_ids"]


def test_missing_dashscope_is_a_clear_import_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dashscope" else real(name, *a))
    with pytest.raises(ImportError, match="pip install dashscope tiktoken"):
        qtok.build_qwen_tokenizer(tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
