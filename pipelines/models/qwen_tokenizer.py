"""The Qwen2 / Qwen2.5-VL tokenizer on the `tokenizers` library alone (no transformers, and torch
only for `return_tensors="pt"`): reads a hub tokenizer folder and gives the ids
`transformers.AutoTokenizer` gives for it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

# The pre-tokenizer split of Qwen2 / Qwen2.5 (single digits). transformers 5.x builds its
# Qwen2Tokenizer with this pattern whatever tokenizer.json says; so does QwenTokenizer.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# Qwen2Tokenizer's defaults for the named special tokens a tokenizer_config.json leaves out.
_QWEN2_SPECIAL_DEFAULTS = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                           "pad_token": "<|endoftext|>"}
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKENIZER_FIX = ("fetch the model's `tokenizer/` folder again (for Qwen-Image: tokenizer.json or vocab.json + "
                  "merges.txt, with tokenizer_config.json), or write one with "
                  "pipelines.demo.tokenizer.build_qwen_tokenizer")


class TokenizerOutput(dict):
    """`input_ids` and `attention_mask`, as keys and as attributes (like transformers' BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error}); {_TOKENIZER_FIX}") from error


def _token_content(value: Any, where: str) -> str | None:
    """A special token as the config files write it: a string, null, or {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or {{\"content\": ...}}, got {value!r}")


class QwenTokenizer:
    """The Qwen2 / Qwen2.5-VL byte-level BPE tokenizer on the `tokenizers` library alone.

    `QwenTokenizer.from_folder(folder)` reads a hub tokenizer folder (tokenizer.json, or
    vocab.json + merges.txt; tokenizer_config.json, special_tokens_map.json, added_tokens.json)
    the way transformers 5.x's `AutoTokenizer` builds its `Qwen2Tokenizer` from it: the BPE
    model with Qwen2's settings, NFC normalisation, Qwen2's split pattern then the byte-level
    mapping (the pre-tokenizer written in tokenizer.json is not used, as in transformers), the
    added tokens of tokenizer_config.json at their ids, the named special tokens, the padding
    side. Calling it gives the ids `AutoTokenizer` gives:

        tokenizer(text or [texts], return_tensors="pt", padding=True) -> input_ids, attention_mask
    """

    def __init__(self, backend: Any, *, special_tokens: Mapping[str, str | None], padding_side: str = "right",
                 source: str = "tokenizer"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"{source}: padding_side must be 'right' or 'left', got {padding_side!r}")
        self._backend = backend
        self.special_tokens = dict(special_tokens)
        self.padding_side = padding_side
        self.source = source

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenTokenizer":
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder; {_TOKENIZER_FIX}")
        config = cls._read_config(folder, "tokenizer_config.json")
        special_map = cls._read_config(folder, "special_tokens_map.json")
        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None and tokenizer_class not in QWEN2_TOKENIZER_CLASSES:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: tokenizer_class {tokenizer_class!r} is not a Qwen2 tokenizer "
                f"({' or '.join(QWEN2_TOKENIZER_CLASSES)}); Qwen-Image needs the Qwen2.5-VL tokenizer: "
                f"{_TOKENIZER_FIX}")

        backend, source, from_json = cls._read_backend(folder, "added_tokens_decoder" in config)
        # what transformers' Qwen2Tokenizer sets, whatever the file says
        add_prefix_space = bool(config.get("add_prefix_space") or False)
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        file_padding = backend.padding
        backend.no_padding()  # padding and truncation are done per call
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens") or False)

        special = {}
        for name in _NAMED_SPECIAL:
            where = folder / ("tokenizer_config.json" if name in config else "special_tokens_map.json")
            if name in config:
                special[name] = _token_content(config[name], str(where))
            elif name in special_map:
                special[name] = _token_content(special_map[name], str(where))
            elif name == "pad_token" and file_padding is not None:
                special[name] = file_padding.get("pad_token")
            else:
                special[name] = _QWEN2_SPECIAL_DEFAULTS.get(name)
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or \
            special_map.get("additional_special_tokens") or []
        extra_contents = [_token_content(t, str(folder / "tokenizer_config.json")) for t in extra]

        cls._add_declared_tokens(backend, folder, config, special, extra_contents, from_json)
        missing = [t for t in [*special.values(), *extra_contents] if t is not None and backend.token_to_id(t) is None]
        if missing:  # named special tokens the files do not declare: appended, as transformers does
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        cls._set_post_processor(backend, config, special, keep=from_json)

        padding_side = config.get("padding_side") or (file_padding or {}).get("direction") or "right"
        return cls(backend, special_tokens=special, padding_side=padding_side, source=source)

    @staticmethod
    def _read_config(folder: Path, name: str) -> dict:
        path = folder / name
        if not path.is_file():
            return {}
        data = _read_json_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {_TOKENIZER_FIX}")
        return data

    @staticmethod
    def _read_backend(folder: Path, config_declares_added: bool) -> tuple[Any, str, bool]:
        """The `tokenizers.Tokenizer` with the BPE model of tokenizer.json (or vocab.json +
        merges.txt) set up as transformers' Qwen2Tokenizer builds it; (tokenizer, source, from tokenizer.json)."""
        from tokenizers import Tokenizer
        from tokenizers.models import BPE

        settings = dict(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False)
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                backend = Tokenizer.from_file(str(path))
            except Exception as error:  # the tokenizers library raises bare Exceptions for broken files
                raise ValueError(f"{path}: the `tokenizers` library cannot read it ({error}); {_TOKENIZER_FIX}") \
                    from error
            if not isinstance(backend.model, BPE):
                raise ValueError(f"{path}: the model is {type(backend.model).__name__}, not the byte-level BPE of "
                                 f"the Qwen2 tokenizer; {_TOKENIZER_FIX}")
            for name, value in {**settings, "ignore_merges": False}.items():
                setattr(backend.model, name, value)
            if config_declares_added:
                # tokenizer_config.json's added tokens are the ones that count (transformers drops the
                # file's): the same BPE model in a tokenizer without them
                written = backend
                backend = Tokenizer(written.model)
                backend.post_processor = written.post_processor
                if written.padding is not None:
                    backend.enable_padding(**written.padding)
            return backend, str(path), True
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not vocab.is_file() or not merges.is_file():
            found = sorted(p.name for p in folder.iterdir())
            lacking = " and ".join(p.name for p in (vocab, merges) if not p.is_file())
            raise FileNotFoundError(
                f"{folder}: no tokenizer.json and no {lacking} (found: {', '.join(found) or 'nothing'}); "
                f"{_TOKENIZER_FIX}")
        try:
            model = BPE.from_file(str(vocab), str(merges), **settings)
        except Exception as error:
            raise ValueError(f"{vocab} + {merges.name}: the `tokenizers` library cannot read them ({error}); "
                             f"{_TOKENIZER_FIX}") from error
        return Tokenizer(model), str(vocab.parent), False

    @staticmethod
    def _add_declared_tokens(backend: Any, folder: Path, config: Mapping[str, Any], special: Mapping[str, Any],
                             extra: Sequence[str | None], from_json: bool) -> None:
        """The added tokens at the ids the files declare: tokenizer_config.json's
        `added_tokens_decoder`, or without it added_tokens.json (special when named as such)
        and tokenizer.json's own list (already in the backend)."""
        from tokenizers import AddedToken

        declared: dict[int, AddedToken] = {}
        source = folder / "tokenizer_config.json"
        if "added_tokens_decoder" in config:
            entries = config["added_tokens_decoder"]
            if not isinstance(entries, Mapping):
                raise ValueError(f"{source}: `added_tokens_decoder` must be an object of id -> token; {_TOKENIZER_FIX}")
            for index, entry in entries.items():
                try:
                    token_id = int(index)
                    declared[token_id] = AddedToken(
                        entry["content"], single_word=bool(entry.get("single_word", False)),
                        lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                        normalized=bool(entry.get("normalized", not entry.get("special", False))),
                        special=bool(entry.get("special", False)))
                except (TypeError, ValueError, KeyError, AttributeError) as error:
                    raise ValueError(f"{source}: added token {index!r} is not an id with a token "
                                     f"{{\"content\": ...}} ({error!r}); {_TOKENIZER_FIX}") from error
        elif (folder / "added_tokens.json").is_file():
            source = folder / "added_tokens.json"
            entries = _read_json_file(source)
            named = {t for t in [*special.values(), *extra] if t is not None}
            if not isinstance(entries, Mapping) or not all(isinstance(i, int) for i in entries.values()):
                raise ValueError(f"{source}: expected an object of token -> id; {_TOKENIZER_FIX}")
            for content, token_id in entries.items():
                declared[token_id] = AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                                                normalized=content not in named, special=content in named)
        for token_id, token in sorted(declared.items()):
            present = backend.token_to_id(token.content)
            if present is None:
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
                present = backend.token_to_id(token.content)
            if present != token_id:
                raise ValueError(
                    f"{source}: the added token {token.content!r} is declared with id {token_id} but the vocabulary "
                    f"gives it {present}: the tokenizer files do not belong together; {_TOKENIZER_FIX}")

    @staticmethod
    def _set_post_processor(backend: Any, config: Mapping[str, Any], special: Mapping[str, Any], keep: bool) -> None:
        """tokenizer.json's post-processor; without one a template adding bos/eos where
        tokenizer_config.json asks for them (add_bos_token / add_eos_token), as transformers builds it."""
        from tokenizers import processors

        if keep and backend.post_processor is not None:
            return
        pieces, tokens = ["$A:0"], []
        bos, eos = special.get("bos_token"), special.get("eos_token")
        if config.get("add_bos_token") and bos is not None:
            pieces.insert(0, f"{bos}:0")
            tokens.append((bos, backend.token_to_id(bos)))
        if config.get("add_eos_token") and eos is not None:
            pieces.append(f"{eos}:0")
            tokens.append((eos, backend.token_to_id(eos)))
        single = " ".join(pieces)
        pair = single + " " + " ".join(("$B" if p == "$A:0" else p[:-2]) + ":1" for p in pieces)
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)

    # ---- use -----------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` underneath."""
        return self._backend

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"QwenTokenizer({self.source!r}, {len(self)} tokens, padding_side={self.padding_side!r})"

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); an unknown token gives the unk id (None without one)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # a tensor
            ids = ids.tolist()
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool | str = False,
                 max_length: int | None = None, add_special_tokens: bool = True) -> TokenizerOutput:
        """Text or texts -> {"input_ids", "attention_mask"}: lists (one list for one text), or
        with return_tensors="pt" (B, L) int64 tensors. `padding`: False / "do_not_pad", True /
        "longest" (to the longest text) or "max_length" (to `max_length`), with the pad token on
        the tokenizer's `padding_side`. Nothing is truncated."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer: expected a string or a list of strings")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"tokenizer: return_tensors must be None or 'pt', got {return_tensors!r}")
        rows = [self._backend.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
        target = self._padded_length(rows, padding, max_length)
        masks = [[1] * len(r) for r in rows]
        if target is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError(f"{self.source}: padding asked for but the tokenizer has no pad token")
            for i, row in enumerate(rows):
                fill = target - len(row)
                if fill > 0 and self.padding_side == "right":
                    rows[i], masks[i] = row + [pad_id] * fill, masks[i] + [0] * fill
                elif fill > 0:
                    rows[i], masks[i] = [pad_id] * fill + row, [0] * fill + masks[i]
        if return_tensors is None:
            return TokenizerOutput(input_ids=rows[0] if single else rows, attention_mask=masks[0] if single else masks)
        if len({len(r) for r in rows}) > 1:
            raise ValueError("tokenizer: the texts have different lengths; give padding=True to make one tensor")
        import torch

        shape = (len(rows), len(rows[0]) if rows else 0)
        return TokenizerOutput(input_ids=torch.tensor(rows, dtype=torch.long).reshape(shape),
                               attention_mask=torch.tensor(masks, dtype=torch.long).reshape(shape))

    @staticmethod
    def _padded_length(rows: Sequence[Sequence[int]], padding: bool | str, max_length: int | None) -> int | None:
        if padding in (False, None, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return max((len(r) for r in rows), default=0)
        if padding == "max_length":
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
                raise ValueError(f"tokenizer: padding='max_length' needs max_length, a count of tokens; got "
                                 f"{max_length!r}")
            return max_length
        raise ValueError(f"tokenizer: padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                         f"got {padding!r}")
