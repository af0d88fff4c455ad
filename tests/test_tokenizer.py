"""The offline Qwen tokenizer (pipelines.demo.tokenizer) against tiktoken on the same ranks, with
the pre-tokenizer pattern and the special tokens taken from sources independent of the project:
the pattern of transformers' own Qwen2Tokenizer (which Qwen's tiktoken tokenizer in dashscope
publishes too), the added tokens of Qwen2.5-VL's hub tokenizer_config.json written out below and
cross-checked with transformers' Qwen2.5-VL config and dashscope's tokenizer.

Then the library's QwenTokenizer (the `tokenizers` library alone, no transformers) against
`transformers.AutoTokenizer` on the same folders: the ids of plain prompts, CJK, emoji, empty and
long texts, the templates, the edit templates with `<|image_pad|>` runs, padded batches, the
folder layouts, and clear errors for broken folders."""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("dashscope", reason="the Qwen BPE ranks ship in dashscope")
tiktoken = pytest.importorskip("tiktoken")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PATTERN  # noqa: E402

from pipelines.demo import tokenizer as qtok  # noqa: E402

# The added tokens of Qwen2.5-VL (the hub's Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen-Image
# tokenizer_config.json, `added_tokens_decoder`): id -> content, after the 151,643 BPE ranks.
QWEN25_VL_ADDED_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
    "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

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
    # each branch of the pattern at its edges
    "THEY'LL SAY IT'S 'QUOTED' 'd 's'S 'LL'VE'RE'M'D's",
    "हिन्दी में लिखा पाठ, ภาษาไทย, q̃ and x̂ with combining marks, ǅungla",
    "room 101, 20000 leagues, ½ ² ⅷ Ⅻ 〇, v2.0.1-rc3, 0x1F600",
    "end.\n\nnext:\r\n\r\n  - item;\n\t\tdone!!\n\n\n",
    " \u3000full width space\u00a0nbsp\u2009thin\u200bzero width\u2028line sep",
]


def random_texts(count: int, seed: int) -> list[str]:
    """Strings mixing every character class the pattern distinguishes (seeded: the same each run)."""
    pools = ["abcXYZ", "éüßǅ", "हिन्दी", "ภาษา", "漢字かな", "0123456789", "٣٤५६½²Ⅻ", " ", "  ", "\t", "\n", "\r\n",
             "\u00a0\u3000", "'s", "'T", "'ll", "'RE", "'d", "'", ".,;:!?", "()[]{}<>", "-_/\\#$%&*+=@^`|~", "—…“”",
             "😀", "🏳️‍🌈", "q̃"]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        text = "".join(rng.choice(pools) for _ in range(rng.randint(1, 30)))
        texts.append(unicodedata.normalize("NFC", text))
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return qtok.build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def file_tokenizer(tokenizer_dir):
    """tokenizer.json as written, read by the `tokenizers` library itself: transformers 5 rebuilds
    Qwen2Tokenizer's pipeline from its own pattern, transformers 4.x and other readers use the file's."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def dashscope_resources() -> Path:
    spec = importlib.util.find_spec("dashscope")
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


@pytest.fixture(scope="session")
def reference():
    """tiktoken on dashscope's Qwen ranks with transformers' Qwen2 pattern and the Qwen2.5-VL added
    tokens above: nothing of it comes from pipelines.demo.tokenizer."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(dashscope_resources() / "qwen.tiktoken"))
    return tiktoken.Encoding("qwen2_reference", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=dict(QWEN25_VL_ADDED_TOKENS))


def test_the_reference_sources_agree():
    """transformers' Qwen2 pattern is the one Qwen's own tiktoken tokenizer (dashscope) uses; the
    added-token table matches the ids transformers' Qwen2.5-VL config and dashscope know."""
    from dashscope.tokenizers import qwen_tokenizer
    from transformers import Qwen2_5_VLConfig

    assert QWEN2_PATTERN == qwen_tokenizer.PAT_STR
    assert dict(qwen_tokenizer.SPECIAL_TOKENS[:3]) == {
        i: t for t, i in QWEN25_VL_ADDED_TOKENS.items() if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    config = Qwen2_5_VLConfig()
    ids = QWEN25_VL_ADDED_TOKENS
    assert (config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
            config.video_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|image_pad|>"],
                                       ids["<|video_pad|>"])
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id) == (ids["<|endoftext|>"],
                                                                                   ids["<|im_end|>"])
    assert sorted(ids.values()) == list(range(151643, 151643 + len(ids)))


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
    assert qtok.SPECIAL_TOKEN_IDS == QWEN25_VL_ADDED_TOKENS
    for token, token_id in QWEN25_VL_ADDED_TOKENS.items():
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
def test_same_ids_as_tiktoken(hf_tokenizer, file_tokenizer, reference, text):
    assert unicodedata.is_normalized("NFC", text)  # the HF tokenizer NFC-normalises, tiktoken not
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(text, allowed_special="all")
    assert file_tokenizer.encode(text, add_special_tokens=False).ids == ids
    assert hf_tokenizer.decode(ids) == text
    assert reference.decode(ids) == text


def test_random_texts_give_the_same_ids_as_tiktoken(hf_tokenizer, file_tokenizer, reference):
    """Every branch of the pattern, in random company: a wrong alternative or a lost flag in the
    written tokenizer.json splits some of them differently, and the ids differ."""
    wrong = []
    for text in random_texts(400, seed=0):
        expected = reference.encode(text, allowed_special="all")
        if (hf_tokenizer(text, add_special_tokens=False)["input_ids"] != expected
                or file_tokenizer.encode(text, add_special_tokens=False).ids != expected):
            wrong.append(text)
    assert not wrong, f"{len(wrong)} of 400 texts tokenise differently, e.g. {wrong[:3]!r}"


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



# ------------------------------------------------------------------ QwenTokenizer (no transformers)

EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)  # diffusers' QwenImageEditPlusPipeline template, the instruction part after it
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def _edit_texts() -> list[str]:
    one = EDIT_SYSTEM + "<|vision_start|>" + "<|image_pad|>" * 1024 + "<|vision_end|>把天空变成紫色<|im_end|>\n" \
        "<|im_start|>assistant\n"
    two = EDIT_SYSTEM + PICTURE.format(1).replace("<|image_pad|>", "<|image_pad|>" * 6) + \
        PICTURE.format(2).replace("<|image_pad|>", "<|image_pad|>" * 35) + \
        "Put the cat 🐱 of picture 1 on the sofa of picture 2<|im_end|>\n<|im_start|>assistant\n"
    glued = "x<|image_pad|><|image_pad|>y <|vision_start|> <|image_pad|>\n<|vision_end|>'s <|im_end|>"
    return [one, two, glued]


LONG = " ".join(PROMPTS) * 40  # ~ 20,000 tokens


@pytest.fixture(scope="session")
def qwen_tokenizer(tokenizer_dir):
    from pipelines.models.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer.from_folder(tokenizer_dir)


def test_pattern_is_transformers_qwen2_pattern():
    from pipelines.models.qwen_tokenizer import QWEN2_PRETOKENIZE_PATTERN

    assert QWEN2_PRETOKENIZE_PATTERN == QWEN2_PATTERN


@pytest.mark.parametrize("text", PROMPTS + [TEMPLATE.format(p) for p in PROMPTS] + _edit_texts() +
                         ["", " ", "\n", TEMPLATE.format(""), LONG],
                         ids=lambda t: f"{len(t)}:{t[:12]!r}")
def test_qwen_tokenizer_ids_equal_autotokenizer(qwen_tokenizer, hf_tokenizer, reference, text):
    ours = qwen_tokenizer(text)["input_ids"]
    assert ours == hf_tokenizer(text)["input_ids"]
    assert ours == reference.encode(text, allowed_special="all")  # the independent oracle too
    tensors = qwen_tokenizer(text, return_tensors="pt")
    assert tensors.input_ids.dtype == torch.long and tensors.input_ids.shape == (1, len(ours))
    assert tensors.input_ids[0].tolist() == ours and bool(tensors.attention_mask.all())
    assert qwen_tokenizer.decode(ours) == hf_tokenizer.decode(ours)


def test_qwen_tokenizer_random_texts(qwen_tokenizer, hf_tokenizer):
    wrong = [t for t in random_texts(400, seed=1) if qwen_tokenizer(t)["input_ids"] != hf_tokenizer(t)["input_ids"]]
    assert not wrong, f"{len(wrong)} of 400 texts tokenise differently, e.g. {wrong[:3]!r}"


def test_qwen_tokenizer_padded_batches(qwen_tokenizer, hf_tokenizer):
    batch = [TEMPLATE.format(PROMPTS[0]), TEMPLATE.format(PROMPTS[2]), "", *_edit_texts()[1:]]
    for padding in (True, "longest"):
        ours = qwen_tokenizer(batch, padding=padding, return_tensors="pt")
        ref = hf_tokenizer(batch, padding=padding, return_tensors="pt")
        assert torch.equal(ours.input_ids, ref["input_ids"]) and torch.equal(ours.attention_mask, ref["attention_mask"])
    assert qwen_tokenizer.padding_side == hf_tokenizer.padding_side == "right"
    assert ours.input_ids[2].tolist() == [151643] * ours.input_ids.shape[1]  # the empty text: all padding
    ours = qwen_tokenizer(batch, padding="max_length", max_length=400, return_tensors="pt")
    ref = hf_tokenizer(batch, padding="max_length", max_length=400, return_tensors="pt")
    assert ours.input_ids.shape == (5, 400) and torch.equal(ours.input_ids, ref["input_ids"])
    assert torch.equal(ours.attention_mask, ref["attention_mask"])
    # lists without tensors, as transformers gives them
    assert qwen_tokenizer(batch[:2])["input_ids"] == hf_tokenizer(batch[:2])["input_ids"]
    with pytest.raises(ValueError, match="padding=True"):
        qwen_tokenizer(batch[:2], return_tensors="pt")


def test_qwen_tokenizer_special_tokens_and_vocabulary(qwen_tokenizer, hf_tokenizer):
    for name in ("pad_token", "eos_token", "bos_token", "unk_token"):
        assert getattr(qwen_tokenizer, name) == getattr(hf_tokenizer, name), name
        assert getattr(qwen_tokenizer, f"{name}_id") == getattr(hf_tokenizer, f"{name}_id"), name
    assert len(qwen_tokenizer) == len(hf_tokenizer) == 151665
    for token, token_id in QWEN25_VL_ADDED_TOKENS.items():
        assert qwen_tokenizer.convert_tokens_to_ids(token) == hf_tokenizer.convert_tokens_to_ids(token) == token_id
    assert qwen_tokenizer.convert_tokens_to_ids(["<|image_pad|>", "Ġcat"]) == [151655, 8251]
    assert qwen_tokenizer.convert_tokens_to_ids("<|no such token|>") is None  # no unk token in Qwen2.5-VL
    ids = qwen_tokenizer(TEMPLATE.format(PROMPTS[1]))["input_ids"]
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def _folder_copy(tokenizer_dir: Path, out: Path, drop=(), config_changes=None, json_changes=None) -> Path:
    out.mkdir()
    for p in tokenizer_dir.iterdir():
        if p.name not in drop:
            shutil.copy(p, out / p.name)
    if config_changes:
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.update(config_changes)
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if json_changes:
        data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        json_changes(data)
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def test_qwen_tokenizer_folder_layouts(tokenizer_dir, hf_tokenizer, tmp_path):
    """vocab.json + merges.txt only; left padding from tokenizer_config.json; a tokenizer.json whose
    written pre-tokenizer is another one (transformers 5 ignores it for Qwen2 and so do we): every
    time the ids AutoTokenizer gives for the same folder."""
    from transformers import AutoTokenizer

    from pipelines.models.qwen_tokenizer import QwenTokenizer

    def whitespace_split(data):
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                          "use_regex": False}]}

    folders = {
        "vocab_and_merges": _folder_copy(tokenizer_dir, tmp_path / "slow", drop=("tokenizer.json",)),
        "left_padding": _folder_copy(tokenizer_dir, tmp_path / "left", config_changes={"padding_side": "left"}),
        "other_pre_tokenizer": _folder_copy(tokenizer_dir, tmp_path / "pre", json_changes=whitespace_split),
    }
    texts = [TEMPLATE.format(PROMPTS[5]), PROMPTS[6], *_edit_texts()[1:], ""]
    for name, folder in folders.items():
        ours, ref = QwenTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
        for text in texts:
            assert ours(text)["input_ids"] == ref(text)["input_ids"] == hf_tokenizer(text)["input_ids"], name
        batch_ours = ours(texts, padding=True, return_tensors="pt")
        batch_ref = ref(texts, padding=True, return_tensors="pt")
        assert torch.equal(batch_ours.input_ids, batch_ref["input_ids"]), name
        assert torch.equal(batch_ours.attention_mask, batch_ref["attention_mask"]), name
        assert ours.padding_side == ref.padding_side, name
    left = QwenTokenizer.from_folder(folders["left_padding"])(texts, padding=True)
    assert left.input_ids[1][0] == 151643 and left.attention_mask[1][0] == 0  # the short prompt, padded on the left
    assert left.input_ids[1][-1] != 151643 and left.attention_mask[1][-1] == 1
    # the file's own pre-tokenizer would split differently: the override is what makes the ids equal
    from tokenizers import Tokenizer

    written = Tokenizer.from_file(str(folders["other_pre_tokenizer"] / "tokenizer.json"))
    assert written.encode(PROMPTS[6]).ids != hf_tokenizer(PROMPTS[6])["input_ids"]


def test_qwen_tokenizer_errors_name_the_file_and_the_fix(tokenizer_dir, tmp_path):
    from pipelines.models.qwen_tokenizer import QwenTokenizer

    fix = r"fetch the model's `tokenizer/` folder again"
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'missing'}: no such tokenizer folder; {fix}"):
        QwenTokenizer.from_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty}: no tokenizer\.json and no vocab\.json and merges\.txt "
                                                rf"\(found: nothing\); {fix}.*build_qwen_tokenizer"):
        QwenTokenizer.from_folder(empty)
    no_merges = _folder_copy(tokenizer_dir, tmp_path / "no_merges", drop=("tokenizer.json", "merges.txt"))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json and no merges\.txt \(found: added_tokens"):
        QwenTokenizer.from_folder(no_merges)

    truncated = _folder_copy(tokenizer_dir, tmp_path / "truncated")
    text = (truncated / "tokenizer.json").read_text(encoding="utf-8")
    (truncated / "tokenizer.json").write_text(text[:1000], encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{truncated / 'tokenizer.json'}: the `tokenizers` library cannot read it "
                                         rf"\(.*\); {fix}"):
        QwenTokenizer.from_folder(truncated)
    bad_config = _folder_copy(tokenizer_dir, tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text("{\"pad_token\": ", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad_config / 'tokenizer_config.json'}: cannot read it as JSON .*{fix}"):
        QwenTokenizer.from_folder(bad_config)
    bad_vocab = _folder_copy(tokenizer_dir, tmp_path / "bad_vocab", drop=("tokenizer.json",))
    (bad_vocab / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json \+ merges\.txt: the `tokenizers` library cannot read them"):
        QwenTokenizer.from_folder(bad_vocab)

    def word_level(data):
        data["model"] = {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}

    not_bpe = _folder_copy(tokenizer_dir, tmp_path / "not_bpe", json_changes=word_level)
    with pytest.raises(ValueError, match=r"the model is WordLevel, not the byte-level BPE of the Qwen2 tokenizer"):
        QwenTokenizer.from_folder(not_bpe)
    other_class = _folder_copy(tokenizer_dir, tmp_path / "other_class",
                               config_changes={"tokenizer_class": "T5Tokenizer"})
    with pytest.raises(ValueError, match=r"tokenizer_class 'T5Tokenizer' is not a Qwen2 tokenizer"):
        QwenTokenizer.from_folder(other_class)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    shifted = dict(config["added_tokens_decoder"])
    shifted["151700"] = shifted.pop("151664")  # <|file_sep|> declared at another id
    wrong_ids = _folder_copy(tokenizer_dir, tmp_path / "wrong_ids", config_changes={"added_tokens_decoder": shifted})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: the added token '<\|file_sep\|>' is declared with "
                                         r"id 151700 but the vocabulary gives it 151664: .*do not belong together"):
        QwenTokenizer.from_folder(wrong_ids)
