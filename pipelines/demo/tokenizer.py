"""The real Qwen2 / Qwen2.5-VL tokenizer, built offline from the BPE ranks that ship in the
`dashscope` package (`dashscope/resources/qwen.tiktoken`, 151,643 byte-level BPE tokens).

`build_qwen_tokenizer(out_dir)` writes a folder like the hub's `Qwen/Qwen-Image/tokenizer/`
(vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json) that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads as a
`Qwen2Tokenizer`. The merges are derived as the Qwen2 ones were: for each token, the two parts
that byte-level BPE restricted to lower ranks leaves, one merge per token (151,387 merges).
`build_qwen3_tokenizer(out_dir)` writes the Qwen3-VL one (Qwen-Image 2.1's `processor/`): the
same BPE and added tokens, then four more (`QWEN3_ADDED_TOKENS`).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Qwen's pre-tokenizer split (Qwen2 / Qwen2.5: single digits).
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_TOKENS = 151643

# Added tokens of Qwen2.5-VL after the BPE ranks: (content, special). The last eight are
# added tokens (never split) that Qwen marks as not special (kept by skip_special_tokens).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: NUM_BPE_TOKENS + i for i, (tok, _) in enumerate(ADDED_TOKENS)}

# Qwen3 / Qwen3-VL (the tokenizer of Qwen-Image 2.1's `processor/`): the same BPE and the same
# added tokens, then four more (151665..151668), none of them special.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = ADDED_TOKENS + (
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),  # 151668
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072
QWEN3_MODEL_MAX_LENGTH = 262144

_INSTALL_HINT = (
    "the offline Qwen tokenizer needs the Qwen BPE ranks from the `dashscope` package and "
    "`tiktoken`: pip install dashscope tiktoken (or the project's `demo` extra: "
    "pip install -e '.[demo]')"
)


def qwen_tiktoken_path() -> Path:
    """Path of `dashscope/resources/qwen.tiktoken`, found without importing dashscope."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise ImportError(f"dashscope is installed but has no resources/qwen.tiktoken; {_INSTALL_HINT}")


def load_qwen_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """The tiktoken ranks file: one `base64(token) rank` per line."""
    path = Path(path) if path is not None else qwen_tiktoken_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a `base64 rank` line: {line[:80]!r}") from e
    if len(ranks) != NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(
            f"{path}: expected the {NUM_BPE_TOKENS} Qwen BPE ranks 0..{NUM_BPE_TOKENS - 1}, "
            f"found {len(ranks)} tokens; the dashscope package may be damaged, reinstall it"
        )
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE files."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that makes `token`: BPE on its bytes using only ranks below its own."""
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"Qwen BPE rank {rank} ({token!r}) cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab (in rank order) and merges (one per multi-byte token, in rank order)."""
    table = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[c] for c in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) > 1:
            left, right = _merge_of(token, rank, ranks)
            merges.append((to_str(left), to_str(right)))
    return vocab, merges


def _added_token_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _added_ids(added: Sequence[tuple[str, bool]]) -> dict[str, int]:
    return {tok: NUM_BPE_TOKENS + i for i, (tok, _) in enumerate(added)}


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], added: Sequence[tuple[str, bool]]) -> str:
    """tokenizer.json as the `tokenizers` library writes Qwen2's (NFC, regex split, byte level)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens(
        [AddedToken(c, special=s, normalized=False, lstrip=False, rstrip=False, single_word=False) for c,
         s in added]
    )
    for content, token_id in _added_ids(added).items():
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"tokenizer build: {content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok.to_str(pretty=False)


def _tokenizer_config(added: Sequence[tuple[str, bool]], model_max_length: int) -> dict:
    ids = _added_ids(added)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[c]): _added_token_entry(c, s) for c, s in added
        },
        "additional_special_tokens": [c for c, s in added if s and c != PAD_TOKEN],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map(added: Sequence[tuple[str, bool]]) -> dict:
    return {
        "additional_special_tokens": [c for c, s in added if s and c != PAD_TOKEN],
        "eos_token": _added_token_entry(EOS_TOKEN, True),
        "pad_token": _added_token_entry(PAD_TOKEN, True),
    }


def build_qwen_tokenizer(out_dir: str | os.PathLike, tiktoken_file: str | os.PathLike | None = None, *,
                         added_tokens: Sequence[tuple[str, bool]] = ADDED_TOKENS,
                         model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write the Qwen2.5-VL tokenizer folder to `out_dir` (created if needed) and return it
    (`added_tokens`, `model_max_length`: another Qwen vocabulary, see `build_qwen3_tokenizer`).

    Takes ~2 s. Files are written to a temporary folder first and moved in, so an interrupted
    build never leaves a half-written tokenizer behind. Raises ImportError when `dashscope` (the
    source of the ranks) is not installed and no `tiktoken_file` is given.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    ranks = load_qwen_ranks(tiktoken_file)
    vocab, merges = vocab_and_merges(ranks)

    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
        "tokenizer.json": _tokenizer_json(vocab, merges, added_tokens),
        "tokenizer_config.json": json.dumps(_tokenizer_config(added_tokens, model_max_length), indent=2,
                                            ensure_ascii=False),
        "special_tokens_map.json": json.dumps(_special_tokens_map(added_tokens), indent=2, ensure_ascii=False),
        "added_tokens.json": json.dumps(_added_ids(added_tokens), indent=2, ensure_ascii=False),
    }
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        for name in files:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built the Qwen tokenizer in %s (%.1f s)", out, time.perf_counter() - start)
    return out


def build_qwen3_tokenizer(out_dir: str | os.PathLike, tiktoken_file: str | os.PathLike | None = None) -> Path:
    """Write the Qwen3-VL tokenizer folder (Qwen-Image 2.1's: Qwen2.5-VL's plus `QWEN3_ADDED_TOKENS`'
    last four) to `out_dir` and return it."""
    return build_qwen_tokenizer(out_dir, tiktoken_file, added_tokens=QWEN3_ADDED_TOKENS,
                                model_max_length=QWEN3_MODEL_MAX_LENGTH)
