"""Tokenizer: byte-level BPE with tiktoken's semantics, on the C++ encoder and trainer of pyllm._C.

Ranks: token id = tiktoken "rank"; ids 0..255 of a trained vocabulary are the single bytes, the
merges follow in the order they were learned, then the special tokens.
"""
from __future__ import annotations

import base64
import binascii
import collections
import functools
import hashlib
import itertools
import json
import numbers
import operator
import os
import re
import unicodedata
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal, Sequence

import numpy as np

from pyllm import _C
from pyllm.tokenizer.patterns import (ONIGURUMA_POSIX, PATTERNS, RUST_POSIX, SPELLINGS, hf_spelling,
                                      regex_pieces, respell_anchors, respell_posix, text_parts)

_MAGIC = "#pyllm-bpe v1"
# Unicode normalization forms a Tokenizer may apply (unicodedata.normalize's, Hugging Face's normalizers').
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
# Texts are handed to C++ in batches of about this many bytes (bounds the memory of one call).
_COUNT_BATCH_BYTES = 32 << 20
# A training file larger than this is read in parts cut at patterns.SAFE_CUTS (a built-in pattern's
# pieces there are the whole's): memory a few parts, not the file (a 200 MB file had taken ~7x).
_PART_BYTES = 16 << 20


class InvalidTokenError(KeyError, ValueError):
    """An id that is no token of the vocabulary. tiktoken raises KeyError there and pyllm raised
    ValueError, so code written against either keeps catching it."""

    def __str__(self) -> str:  # KeyError's would quote the message as if it were a key
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class TokenIdOverflowError(OverflowError, ValueError):
    """An id outside [0, 2**32): tiktoken cannot convert it (OverflowError); pyllm raised ValueError."""


class _Unset:
    """The default of a parameter that may be passed under either of two names (pyllm's, tiktoken's)."""

    def __repr__(self) -> str:
        return "<required>"


_UNSET = _Unset()


def _either(value, alias, where: str, name: str, alias_name: str):
    """value, or alias when only it was given: pyllm's parameter names (ids, texts) and tiktoken's
    (tokens, text) both work, by keyword too."""
    if alias is _UNSET:
        if value is _UNSET:
            raise TypeError(f"{where}() missing its required argument {name!r} (or {alias_name!r}, tiktoken's name)")
        return value
    if value is not _UNSET:
        raise TypeError(f"{where}() got both {name!r} and {alias_name!r}, which name the same argument")
    return alias


def _disallowed_message(token: str) -> str:
    # tiktoken's wording, which callers may match on.
    return (f"Encountered text corresponding to disallowed special token {token!r}.\n"
            "If you want this text to be encoded as a special token, pass it to `allowed_special`, e.g. "
            f"`allowed_special={{{token!r}, ...}}`.\n"
            "If you want this text to be encoded as normal text, disable the check for this token by passing "
            f"`disallowed_special=(enc.special_tokens_set - {{{token!r}}})`.\n"
            "To disable this check for all special tokens, pass `disallowed_special=()`.\n")


def _check_strs(names: set, argument: str, where: str) -> None:
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{where}: {argument} must hold str, got {name!r}")


def _check_disallowed(texts: Iterable[str], names: Collection[str]) -> None:
    """ValueError naming the disallowed string that comes first in the first text holding one, as
    tiktoken's regex search does (at one position, the longest)."""
    for text in texts:
        first = None
        for name in names:
            at = text.find(name)
            if at >= 0 and (first is None or at < first[0] or (at == first[0] and len(name) > len(first[1]))):
                first = (at, name)
        if first is not None:
            raise ValueError(_disallowed_message(first[1]))


def _check_encodable(where: str, token: str) -> None:
    """A special token is matched as its UTF-8 bytes: one with a lone surrogate has none."""
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: {token!r} holds a lone surrogate, which has no UTF-8 bytes to match") from None


def _fix_surrogates(text: str) -> str:
    # Lone surrogates cannot be encoded as UTF-8; tiktoken replaces them with U+FFFD the same way.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8_safe(text: str) -> str:
    """text, its lone surrogates replaced first (as tiktoken does before it splits: a surrogate pair
    written as two code points is then one character, not two replacement characters)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _fix_surrogates(text)


# Rust's char::is_whitespace (Unicode's White_Space), what tokenizers' lstrip / rstrip added tokens take
# in (Python's \s has the separators U+001C-U+001F too)
_WHITE_SPACE_CHARS = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
                      + "\u2028\u2029\u202f\u205f\u3000")
_WHITE_SPACE = f"[{re.escape(_WHITE_SPACE_CHARS)}]"
_WHITE_SPACE_RUN_UTF8 = re.compile(b"(?:%s)*" % b"|".join(re.escape(c.encode("utf-8")) for c in _WHITE_SPACE_CHARS))


def _split_keeping(special_re: re.Pattern, text: str) -> list[str]:
    """text cut at special_re's matches: [text, special, text, ..., text]."""
    parts, pos = [], 0
    for m in special_re.finditer(text):
        parts += [text[pos:m.start()], m.group(0)]
        pos = m.end()
    return parts + [text[pos:]]


_WHITE_SPACE_RUN = re.compile(f"{_WHITE_SPACE}*")


def _split_stripping(special_re: re.Pattern, text: str, strip: dict) -> list[str]:
    """_split_keeping, a special token that strips (strip: its name -> "l", "r" or "lr") taking in
    the white space beside it as tokenizers' AddedVocabulary.find_matches does: back to the end of
    the match before (lstrip), forward to the next other character (rstrip). Each match is found
    by its text alone and widened after, in one pass (a regex of "white space, then the token" had
    been retried at every position of a run of white space: quadratic in the run)."""
    parts, pos = [], 0
    for m in special_re.finditer(text):
        start, end, side = m.start(), m.end(), strip.get(m.group(0), "")
        if "l" in side:
            while start > pos and _WHITE_SPACE_RUN.match(text, start - 1, start).end() == start:
                start -= 1
            start = max(start, pos)
        if "r" in side:
            end = _WHITE_SPACE_RUN.match(text, end).end()
        parts += [text[pos:start] if pos < start else "", m.group(0)]
        pos = end
    return parts + [text[pos:]]


def _header_digest(header: dict) -> str:
    """The SHA-256 of a saved tokenizer's header (all but this digest itself), canonical JSON: the
    ranks' digest does not cover the pattern, the special tokens or the normalization."""
    fields = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def _resolve_pattern(pattern) -> tuple[str | None, str, int]:
    """(built-in name or None, regex string, C++ pattern code; -1 for a custom pattern)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a built-in name or a regex), got {type(pattern).__name__}")
    if pattern in PATTERNS:
        return pattern, *PATTERNS[pattern]
    for name, (regex_str, code) in PATTERNS.items():
        if pattern == regex_str:
            return name, regex_str, code
    if pattern in SPELLINGS:  # the same pieces in other words (Hugging Face's): keep the C++ pre-tokenizer
        return SPELLINGS[pattern], *PATTERNS[SPELLINGS[pattern]]
    if re.fullmatch(r"[A-Za-z0-9_-]+", pattern):  # a name, not a regex: as a regex it matches only itself,
        # and every other character of a text would be dropped (encode("hello") == [])
        alias = _TIKTOKEN_NAMES.get(pattern.lower(), pattern.lower() if pattern.lower() in PATTERNS else None)
        hint = f" (tiktoken's {pattern!r} splits as {alias!r})" if alias else ""
        raise ValueError(f"pattern {pattern!r} is no built-in pattern name ({', '.join(PATTERNS)}){hint}; a regex "
                         "made of letters and digits alone would match only that literal text")
    return None, pattern, -1


# tiktoken's encoding names -> the built-in pattern each splits with (for the error message)
_TIKTOKEN_NAMES = {"r50k_base": "gpt2", "p50k_base": "gpt2", "p50k_edit": "gpt2", "cl100k_base": "gpt4",
                   "o200k_base": "gpt4o"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (Radford et al. 2019, encoder.py), which Hugging Face's byte-level
    BPE vocabularies are written in: printable Latin-1 bytes stand for themselves, the other 68
    bytes for code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


# Hugging Face's Digits pre-tokenizer (StarCoder's and SmolLM's tokenizers put it before GPT-2's
# ByteLevel) cuts the text at every digit (or digit run) first, and ByteLevel's regex then runs on
# each piece alone. One regex over the whole text does the same: digits first, no other alternative
# takes a digit, and the whitespace lookahead sees a digit as the end of the piece it is in.
_HF_DIGITS_THEN_GPT2 = r"""\p{N}%s|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _hf_pattern(pre_tokenizer, where: str) -> str:
    """The split regex of a Hugging Face byte-level pre-tokenizer: ByteLevel's own (GPT-2's: the
    "gpt2" pattern, which splits the same), Digits then ByteLevel's own, or a Split regex followed
    by a ByteLevel without one."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else [pre_tokenizer]
    steps = [s for s in steps or [] if s]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        raise NotImplementedError(f"{where}: pre-tokenizer {pre_tokenizer!r}: expected one ByteLevel step without "
                                  "add_prefix_space")
    if steps == byte_level and byte_level[0].get("use_regex", True):
        return "gpt2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and byte_level[0].get("use_regex", True):
        return _HF_DIGITS_THEN_GPT2 % ("" if steps[0].get("individual_digits") else "+")
    split = steps[0] if len(steps) == 2 and steps[1] is byte_level[0] else {}
    if (split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {}) or split.get("invert")
            or split.get("behavior") != "Isolated" or byte_level[0].get("use_regex", True)):
        raise NotImplementedError(f"{where}: pre-tokenizer {pre_tokenizer!r}: expected ByteLevel, or an isolating "
                                  "Split regex and then ByteLevel without its own")
    regex = split["pattern"]["Regex"]
    # Oniguruma's bare ^ / $ are a line's start / end: (?m:^) / (?m:$) in tiktoken's syntax (the
    # built-ins' spellings end "\s++$", the same pieces either way, and keep their C++ pre-tokenizers)
    # Oniguruma's POSIX classes are Unicode, Rust's ASCII: written as Oniguruma's sets
    return regex if regex in SPELLINGS else respell_anchors(respell_posix(regex, ONIGURUMA_POSIX)[0], "(?m:^)", "(?m:$)")


def _flat_normalizers(normalizer: dict) -> list[dict]:
    """A tokenizer.json normalizer as its steps: nested Sequences flattened, an empty one none."""
    if normalizer.get("type") == "Sequence":
        return [step for inner in normalizer.get("normalizers") or [] for step in _flat_normalizers(inner or {})]
    return [normalizer] if normalizer else []


# transformers 5's tokenizer classes that rebuild a SentencePiece-style pipeline of their own from a
# tokenizer.json's vocabulary and merges alone (its normalizer and pre-tokenizer unread)
_LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_CODE_LLAMA_TOKENIZER_CLASSES = ("CodeLlamaTokenizer", "CodeLlamaTokenizerFast")  # ("first" whatever legacy)
# transformers 5's GemmaTokenizer: Replace(" ", "▁") and a no-op Split, BPE with byte fallback and fused <unk>,
# no ignore_merges, whatever the tokenizer.json says
_GEMMA_TOKENIZER_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast")


def _json_beside(path, name: str) -> dict:
    """The JSON object in the file `name` beside a tokenizer.json ({} where there is none, or it is no
    JSON object)."""
    try:
        with open(os.path.join(os.path.dirname(os.fspath(path)), name), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _tokenizer_config(path) -> dict:
    """The tokenizer_config.json beside a tokenizer.json ({} where there is none, or it is no JSON object)."""
    return _json_beside(path, "tokenizer_config.json")


# Model types that transformers 5 registers to TokenizersBackend (MistralCommonBackend with mistral_common
# installed, TokenizersBackend still for a folder without Mistral's own tokenizer files): AutoTokenizer reads
# the tokenizer.json of a checkpoint whose config.json has one of them as it is, whatever tokenizer_class its
# tokenizer_config.json names (Mistral v0.x's, Mixtral's and Phi-3's LlamaTokenizer, Phi-4's GPT2Tokenizer):
# models/auto/tokenization_auto.py's TOKENIZER_MAPPING_NAMES, transformers 5.25
_FILE_AS_IS_MODEL_TYPES = frozenset({
    "arctic", "chatlm", "ernie4_5", "ernie4_5_moe", "flex_olmo", "glm", "glm4", "glm4_moe", "glm4_moe_lite",
    "gpt_bigcode", "granite", "granitemoe", "granitemoehybrid", "granitemoeshared", "hyperclovax", "internlm2",
    "internlm3", "jamba", "kimi_k25", "kimi_linear", "mimo_v2_flash", "minicpm3", "minimax_m2", "ministral",
    "ministral3", "mistral", "mistral3", "mistral_large4", "mixtral", "nemotron", "olmo2", "olmo3", "olmo_hybrid",
    "persimmon", "phi3", "phimoe", "stablelm"})


def _transformers_tokenizer_class(path, config: dict) -> str | None:
    """The tokenizer class transformers 5's AutoTokenizer builds for the folder of a tokenizer.json, as far
    as from_hf follows it: tokenizer_config.json's tokenizer_class (config), but TokenizersBackend (the file
    as it is) where the folder's config.json names a model type registered to it."""
    kind = config.get("tokenizer_class")
    if kind and _json_beside(path, "config.json").get("model_type") in _FILE_AS_IS_MODEL_TYPES:
        return "TokenizersBackend"
    return kind


def _transformers_class_pipeline(config: dict, spm: dict) -> dict:
    """spm as transformers 5 encodes with it: a tokenizer_config.json beside the tokenizer.json naming
    LlamaTokenizer (Llama 2's, TinyLlama's; not where config.json's model_type is Mistral's or Phi-3's:
    _transformers_tokenizer_class) makes transformers build a
    Metaspace(prepend_scheme="first" unless "legacy": true ("always"), "never" for add_prefix_space
    false, split=False) without the file's normalizer: no "▁" after a special token where legacy
    is false (the file's Prepend normalizer puts one there), as TRL 1.16's SFT / DPO data then has
    it. GemmaTokenizer: Replace(" ", "▁") ("never", no split), byte fallback and fused <unk>, whatever
    the file says (Gemma's own files say the same). Any other class (PreTrainedTokenizerFast, none):
    the file as it is. config: the tokenizer_config.json (_tokenizer_config)."""
    kind = config.get("tokenizer_class")
    if kind in _GEMMA_TOKENIZER_CLASSES:
        return {**spm, "prepend": "never", "split": False, "byte_fallback": True, "fuse_unk": True,
                "whole_first": False}
    if kind not in _LLAMA_TOKENIZER_CLASSES + _CODE_LLAMA_TOKENIZER_CLASSES:
        return spm
    prefix = config.get("add_prefix_space")
    legacy = config.get("legacy", False) and kind in _LLAMA_TOKENIZER_CLASSES  # (CodeLlamaTokenizer reads none)
    prepend = "never" if prefix is not None and not prefix else ("always" if legacy else "first")
    return {**spm, "prepend": prepend, "split": False}


def _hf_sentencepiece(data: dict, where: str) -> dict | None:
    """{"prepend", "split"} when a tokenizer.json is SentencePiece-style (spaces written "▁" by a
    Prepend + Replace normalizer, as Llama 2's, or a Metaspace pre-tokenizer, as Mistral's later
    ones), None when it is byte-level; raises on the forms in between."""
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer] if normalizer else []
    kinds = sorted(step.get("type") for step in steps)
    replaces_space = [step for step in steps if step.get("type") == "Replace"
                      and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE]
    if pre.get("type") == "Metaspace":
        if steps or pre.get("replacement", _SPACE) != _SPACE:
            raise NotImplementedError(f"{where}: Metaspace {pre!r} after the normalizer {normalizer!r}: only a "
                                      "Metaspace with '▁' and no normalizer")
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme not in ("always", "first", "never"):
            raise NotImplementedError(f"{where}: Metaspace prepend_scheme {scheme!r}")
        return {"prepend": scheme, "split": bool(pre.get("split", True))}
    if not replaces_space and not data.get("model", {}).get("byte_fallback"):
        return None  # byte-level
    prepends = [step for step in steps if step.get("type") == "Prepend" and step.get("prepend") == _SPACE]
    if pre.get("type") == "Split" and pre.get("pattern") == {"String": " "} and not pre.get("invert") and replaces_space:
        pre = {}  # a split at " " after every " " became "▁" (Gemma's) cuts nothing
    if pre or len(replaces_space) != 1 or kinds not in (["Prepend", "Replace"], ["Replace"]) or (
            "Prepend" in kinds and not prepends):
        raise NotImplementedError(f"{where}: normalizer {normalizer!r} and pre-tokenizer {pre!r}: a SentencePiece-style "
                                  "BPE is read with a Prepend('▁') + Replace(' ', '▁') normalizer (or the "
                                  "Replace alone) and no pre-tokenizer, or a Metaspace pre-tokenizer")
    return {"prepend": "all" if prepends else "never", "split": False}


def chat_template_files(folder) -> list[str]:
    """The files a folder's chat template is made from: tokenizer_config.json, chat_template.jinja,
    special_tokens_map.json (bos / eos only there in older folders) and save_pretrained's
    additional_chat_templates/*.jinja ("tool_use", rendered where tools are given); those that are
    not there among them."""
    folder = os.fspath(folder)
    files = [os.path.join(folder, name) for name in ("tokenizer_config.json", "chat_template.jinja",
                                                       "special_tokens_map.json")]
    named = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(named):
        files += sorted(os.path.join(named, name) for name in os.listdir(named) if name.endswith(".jinja"))
    return files


def chat_template_sha1(folder) -> str:
    """sha1 of the text of chat_template_files: token files rendered with another text are made again
    (a changed tool_use.jinja or special_tokens_map.json had reused them)."""
    return hashlib.sha1(b"".join(os.path.basename(p).encode() + b"\0" + Path(p).read_bytes()
                                 for p in chat_template_files(folder) if os.path.isfile(p))).hexdigest()


def _chat_template(folder, tools=None) -> tuple:
    """_compiled_chat_template of folder, compiled again when its files change; its "tool_use"
    template where tools are given and it has one (transformers' get_chat_template)."""
    folder = os.path.abspath(os.fspath(folder))
    stamps = tuple((p, os.stat(p).st_mtime_ns if os.path.exists(p) else None) for p in chat_template_files(folder))
    return _compiled_chat_template(folder, stamps, "tool_use" if tools is not None else "default")


def _template_text(folder, config: dict, variant: str = "default") -> str | None:
    """The chat template's text a folder renders with, as transformers picks it: tokenizer_config.json's
    (config; of a list of named ones, variant's, else "default"), chat_template.jinja over it, and
    save_pretrained's additional_chat_templates/VARIANT.jinja over that for another variant."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get(variant) or named.get("default")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja_path):  # the file wins, as in transformers (a template fixed by writing one)
        template = Path(jinja_path).read_text(encoding="utf-8")
    named_path = os.path.join(folder, "additional_chat_templates", f"{variant}.jinja")  # (save_pretrained's)
    if variant != "default" and os.path.exists(named_path):
        template = Path(named_path).read_text(encoding="utf-8")
    return template


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(folder: str, stamps: tuple, variant: str = "default"):
    """(the compiled chat template of a Hugging Face checkpoint folder, its {% generation %} tracker,
    the variables it is rendered with), as transformers compiles it: jinja2 in a sandbox,
    trim_blocks and lstrip_blocks, bos_token / eos_token from tokenizer_config.json."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config_path = os.path.join(folder, "tokenizer_config.json")
    config = json.loads(Path(config_path).read_text(encoding="utf-8")) if os.path.exists(config_path) else {}
    template = _template_text(folder, config, variant)
    if not template:
        raise ValueError(f"{folder}: no chat template (tokenizer_config.json's chat_template or chat_template.jinja)")

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    class Generation(jinja2.ext.Extension):
        """{% generation %} ... {% endgeneration %} (templates marking the assistant's tokens for
        training masks, as SmolLM3's): rendered as its body; while `spans` is a list, each body's
        (start, end) characters in the output are appended to it, the start being the length of
        the chunks the template has yielded so far (`chunks`), as transformers' AssistantTracker
        counts them."""
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self.chunks, self.spans = [], None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            if self.spans is not None:
                start = sum(map(len, self.chunks))
                self.spans.append((start, start + len(text)))
            return text

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    tracker = next(ext for ext in env.extensions.values() if isinstance(ext, Generation))
    # the ones the folder sets, as transformers passes its special tokens (`bos_token is defined` is
    # False without one; it renders "" either way)
    tokens = hf_special_tokens(folder, config)
    variables = {name: tokens[name] for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                                 "cls_token", "mask_token") if name in tokens}
    marked = re.search(r"\{%-?\s*generation\s*[-+]?%\}", template) is not None
    return env.from_string(template), tracker, variables, marked


def hf_special_tokens(folder, config: dict | None = None) -> dict[str, str]:
    """A Hugging Face folder's special tokens by role (bos_token, eos_token, pad_token, ...), each its
    text, as transformers reads them: tokenizer_config.json's (config, where already read) over
    special_tokens_map.json's. Older folders keep them in special_tokens_map.json only: Mistral's
    template had rendered no <s> and no </s> without it, the stop its replies never learned."""
    folder = os.fspath(folder)
    read = lambda name: (json.loads(Path(folder, name).read_text(encoding="utf-8"))  # noqa: E731
                         if os.path.exists(os.path.join(folder, name)) else {})
    config = read("tokenizer_config.json") if config is None else config
    tokens = {**read("special_tokens_map.json"), **{k: v for k, v in config.items() if v is not None}}  # (null: the map's)
    text = {name: value.get("content") if isinstance(value, dict) else value
            for name, value in tokens.items() if name.endswith("_token")}
    return {name: value for name, value in text.items() if isinstance(value, str) and value}


def hf_special_token_ids(folder) -> dict[str, int]:
    """The ids of a Hugging Face folder's special tokens by role ("eos_token", "pad_token", ...), as
    transformers resolves them: each one's text (hf_special_tokens) among tokenizer.json's added
    tokens, tokenizer_config.json's added_tokens_decoder, or the vocabulary; a role none of them
    names is left out. (One read of the files: tokenizer.json is megabytes.)"""
    read = lambda name: (json.loads(Path(folder, name).read_text(encoding="utf-8"))  # noqa: E731
                         if os.path.isfile(os.path.join(os.fspath(folder), name)) else {})
    config, data = read("tokenizer_config.json"), read("tokenizer.json")
    vocab = (data.get("model") or {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids |= {t.get("content"): t.get("id") for t in data.get("added_tokens") or ()}
    ids |= {t.get("content"): int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()
            if isinstance(t, dict)}
    return {role: ids[text] for role, text in hf_special_tokens(folder, config).items()
            if isinstance(ids.get(text), int) and not isinstance(ids[text], bool)}


def hf_special_token_id(folder, role: str) -> int | None:
    """hf_special_token_ids' id of one role, None where none is named."""
    return hf_special_token_ids(folder).get(role)


def hf_has_chat_template(folder) -> bool:
    try:
        _chat_template(folder)
    except ValueError:
        return False
    return True


# The names a message's reasoning comes under (transformers' _REASONING_FIELDS, the first the one
# templates read; gpt-oss's read "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: list[dict]) -> list[dict]:
    """messages as transformers' apply_chat_template gives them to a template: keys whose value is
    None dropped (a JSONL row's "content": null had rendered as the word None, and been trained on;
    "tool_calls": null had failed Llama 3.1's template), and a reasoning under any of its names also
    under "reasoning_content" and "thinking" (Qwen3's template reads the first: a "reasoning" key
    had trained an empty <think> block)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"a chat message must be a dict, got {type(message).__name__}: {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _template_inputs(messages: list[dict], add_generation_prompt: bool, variables: dict, tools, documents,
                     template_kwargs: dict) -> dict:
    """What a template is rendered with, as apply_chat_template passes it: messages (already
    _template_messages'), tools and documents always (None when not given), the special tokens,
    then the caller's template kwargs (enable_thinking=, ...)."""
    return {**variables, **template_kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt,
            "tools": tools, "documents": documents}


def hf_chat_prompt(folder, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                   documents: list | None = None, **template_kwargs) -> str:
    """The text a Hugging Face checkpoint folder's chat template makes of messages ([{"role":
    "user", "content": ...}, ...]), as transformers' apply_chat_template renders it (jinja2 in a
    sandbox, trim_blocks and lstrip_blocks, the special tokens from tokenizer_config.json, messages'
    None values dropped, reasoning under each of its names; tools, documents and further template
    variables such as enable_thinking=, as apply_chat_template's). Encode it with
    allowed_special="all": the template writes the special tokens as text."""
    template, _, variables, _ = _chat_template(folder, tools)
    return template.render(**_template_inputs(_template_messages(messages), add_generation_prompt, variables, tools,
                                              documents, template_kwargs))


def _training_template_hint(folder) -> str:
    """Where TRL (when installed) keeps the training variant of folder's chat template: its
    trl/chat_templates/NAME_training.jinja beside a NAME.jinja equal to it; "" where none is."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("trl")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.submodule_search_locations:
        return ""
    templates = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    try:
        own = (_template_text(folder, _tokenizer_config(Path(folder, "tokenizer.json"))) or "").strip()
        for path in sorted(templates.glob("*.jinja")):
            training = path.with_name(path.stem + "_training.jinja")
            if training.is_file() and path.read_text(encoding="utf-8").strip() == own:
                return f" (TRL's for this template: --chat-template {training})"
    except (OSError, ValueError):
        pass
    return ""


def hf_reply_framing(folder, tokenizer: "Tokenizer") -> tuple[list[int], list[int]]:
    """(the ids a folder's chat template puts before an assistant's reply, its generation prompt,
    and those it puts after one: ChatML's "<|im_start|>assistant\n" and "<|im_end|>\n", Llama 3's
    header and "<|eot_id|>"), as a reward model trained on rendered conversations saw a reply
    framed; ([], []) where the template renders a reply otherwise than after its generation prompt."""
    hello = [{"role": "user", "content": "Hello"}]
    mark = "\u2063pyllm reply\u2063"  # (invisible separators: text no template writes itself)
    prompt = hf_chat_prompt(folder, hello, add_generation_prompt=True)
    bare = hf_chat_prompt(folder, hello, add_generation_prompt=False)
    whole = hf_chat_prompt(folder, hello + [{"role": "assistant", "content": mark}], add_generation_prompt=False)
    if not (prompt.startswith(bare) and whole.startswith(prompt + mark)):
        return [], []
    encode = lambda text: tokenizer.encode(text, allowed_special="all") if text else []  # noqa: E731
    return encode(prompt[len(bare):]), encode(whole[len(prompt) + len(mark):])


def _untrained(message: dict) -> bool:
    """An assistant message OpenAI's fine-tuning format marks "weight": 0: in the context, not trained on."""
    weight = message.get("weight", 1)  # (a null one is dropped with the other None values: _template_messages)
    if weight not in (0, 1):
        raise ValueError(f"a message's \"weight\" is 0 or 1 (OpenAI's fine-tuning format), got {weight!r}")
    return weight == 0


def hf_chat_spans(folder, messages: list[dict], train_from: int = 0, tools: list | None = None,
                  documents: list | None = None, **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the (start, end) character spans of what the assistant says in
    it): the template's {% generation %} blocks where it has them (transformers'
    return_assistant_tokens_mask reads the same), else for each assistant message i what the
    conversation up to and with it adds to the conversation before it with the generation prompt
    (the reply and the template's end-of-turn text; an eos_token the template puts at the end of a
    conversation, Phi-3's, only where the whole conversation ends there). The latter needs a
    template that renders every earlier turn as the whole conversation does, or each reply as
    written (then found in place: see in_place); ValueError otherwise. train_from: the spans of the
    assistant messages from this index on only (a prompt's own assistant turns are not trained on).
    tools, documents, template_kwargs: as hf_chat_prompt's (TRL's "tools" and
    "chat_template_kwargs" columns)."""
    template, tracker, variables, marked = _chat_template(folder, tools)
    messages = _template_messages(messages)  # once: every prefix rendered below is a slice of these

    def render(msgs, add_generation_prompt=False):
        return template.render(**_template_inputs(msgs, add_generation_prompt, variables, tools, documents,
                                                  template_kwargs))

    if marked:
        tracker.chunks, tracker.spans = [], []
        try:
            for chunk in template.generate(**_template_inputs(messages, False, variables, tools, documents,
                                                              template_kwargs)):
                tracker.chunks.append(chunk)
            text, spans = "".join(tracker.chunks), tracker.spans
        finally:
            tracker.chunks, tracker.spans = [], None
        if train_from == 0 and not any(map(_untrained, messages)):
            return text, spans
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if len(spans) != len(replies):
            raise ValueError(f"{folder}: the chat template marks {len(spans)} {{% generation %}} blocks for "
                             f"{len(replies)} assistant messages, so the prompt's (or a weight 0 reply's) cannot be "
                             "told from the trained ones")
        return text, [span for span, i in zip(spans, replies) if i >= train_from and not _untrained(messages[i])]
    text, spans = render(messages), []
    eos = variables.get("eos_token")

    def in_place(i: int, before: str) -> tuple[int, int] | None:
        """Reply i's span found inside the whole conversation, for a template that renders the turns
        before it differently alone (Mistral v0.3's system message in the last user turn only): the
        conversation rendered with the reply's content as a sentinel, the reply where the sentinel
        is, as written (trimmed at most), then the end of turn the template writes after it. None
        where the reply is rewritten (a reasoning dropped, Qwen3's): not guessed at. before: the
        conversation before it with the generation prompt, as rendered alone."""
        content, sentinel = messages[i].get("content"), "\ue000pyllm-reply\ue001"
        if not isinstance(content, str) or not content.strip() or any(k in messages[i] for k in _REASONING_FIELDS):
            return None
        probe_messages = [*messages[:i], {**messages[i], "content": sentinel}, *messages[i + 1:]]
        try:
            probe, alone = render(probe_messages), render(probe_messages[:i + 1])
        except Exception:  # (a template that reads the content: not found this way)
            return None
        if probe.count(sentinel) != 1:
            return None
        start, tail = probe.index(sentinel), len(probe) - probe.index(sentinel) - len(sentinel)
        if probe[:start] != text[:start] or probe[len(probe) - tail:] != text[len(text) - tail:]:
            return None
        end = len(text) - tail
        if text[start:end] not in (content, content.strip()):
            return None
        # the spaces the template writes right before the reply (Mistral's "[/INST]" + " " + content) are
        # the reply's, as rendering prefixes and a {% generation %} block count them (a SentencePiece "▁"
        # alone before a reply that starts with a digit had been left untrained), but for those its
        # generation prompt ends in, the prompt's
        spaces = len(text[:start]) - len(text[:start].rstrip(" \t"))
        try:
            bare = render(messages[:i])
            generation = before[len(bare):] if before.startswith(bare) else ""
        except Exception:  # (a template that refuses the turns before alone: Mistral's roles must alternate)
            generation = ""
        if generation and text[:start].endswith(generation):
            spaces -= min(spaces, len(generation) - len(generation.rstrip(" \t")))
        start -= spaces
        # what the template writes after a reply that ends the conversation: its end of turn
        turn_end = alone[alone.index(sentinel) + len(sentinel):] if alone.count(sentinel) == 1 else None
        for ending in ([turn_end, turn_end[:-len(eos)]] if turn_end and eos and turn_end.endswith(eos) else [turn_end]):
            if ending is not None and text.startswith(ending, end):
                return start, end + len(ending)
        return None

    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i < train_from or _untrained(message):
            continue
        try:
            before = render(messages[:i], add_generation_prompt=True)
        except Exception as e:
            if i:
                raise
            # (Qwen2.5's and Llama 3.1's templates read messages[0]: the empty conversation fails)
            raise ValueError(f"{folder}: the conversation opens with an assistant message, and the chat template "
                             f"cannot render the empty conversation before it ({type(e).__name__}: {e}), where its "
                             "reply would start; begin it with a system or user message, or give the first "
                             "message \"weight\": 0 (not trained)") from None
        through = render(messages[:i + 1])
        if eos and through.endswith(eos) and not text.startswith(through) and text.endswith(eos) and (
                text.startswith(through[:-len(eos)])):
            # a conversation the template ends with eos_token (Phi-3's end-of-text) where the whole one goes on
            through = through[:-len(eos)]
        if not (through.startswith(before) and text.startswith(through)) and (span := in_place(i, before)) is not None:
            spans.append(span)
            continue
        if not (through.startswith(before) and text.startswith(through)):
            content = message.get("content")
            if message.get("tool_calls") and not (isinstance(content, str) and content.strip()):
                raise ValueError(
                    f"{folder}: assistant message {i} is a tool call, and the chat template renders the conversation "
                    "before it differently on its own than inside the whole conversation (Mistral's templates put "
                    "the system message and the tool list with the last user message only), so its tokens cannot "
                    "be found by rendering prefixes, and a tool call has no text of its own to find in place; a "
                    "template with {% generation %} ... {% endgeneration %} around each assistant reply marks it "
                    "instead: `pyllm train --chat-template FILE` renders the conversations with one"
                    + _training_template_hint(folder))
            raise ValueError(f"{folder}: the chat template renders the conversation before assistant message {i} "
                             "differently on its own than inside the whole conversation (it rewrites earlier turns, "
                             "as templates dropping earlier reasoning do, the reply itself among them; or its "
                             "generation prompt or its end of a "
                             "conversation, eos_token aside, is not how a turn goes on: DeepSeek-R1's <think>), "
                             "so the assistant's text cannot be found "
                             "by rendering prefixes; a template with {% generation %} ... {% endgeneration %} around "
                             "each assistant reply marks it instead: `pyllm train --chat-template FILE` renders the "
                             "conversations with one" + _training_template_hint(folder))
        spans.append((len(before), len(through)))
    return text, spans


def hf_chat_tokens(folder, tokenizer: "Tokenizer", messages: list[dict], train_from: int = 0,
                   tools: list | None = None, documents: list | None = None,
                   **template_kwargs) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation for fine-tuning: the ids of hf_chat_spans' text (special tokens
    as written, as apply_chat_template encodes it) and mask[j] = 1 where token j holds a character
    of an assistant span (a token straddling a span's edge counts: transformers'
    return_assistant_tokens_mask maps spans to tokens the same way). Where the spans come from
    rendering prefixes (no {% generation %}), a special token that took in a reply's leading white
    space (Phi-3's <|assistant|>, rstrip) is the prompt's, as in TRL's prompt-completion masks."""
    text, spans = hf_chat_spans(folder, messages, train_from, tools, documents, **template_kwargs)
    ids = tokenizer.encode(text, allowed_special="all")
    ends, own = _token_ends(tokenizer, ids, text)  # byte offset in text where each token ends
    starts_at = ends if _chat_template(folder, tools)[3] else own  # (marked: transformers' mask counts it)
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    char_bytes = np.concatenate([[0], np.cumsum(1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000))])
    mask = np.zeros(len(ids), np.int64)
    for start, end in spans:
        if end <= start:
            continue
        first = int(np.searchsorted(starts_at, char_bytes[start], side="right"))  # the token holding b: first end > b
        last = int(np.searchsorted(ends, char_bytes[end - 1], side="right"))
        mask[first:min(last, len(ids) - 1) + 1] = 1
    return ids, mask.tolist()


def _token_ends(tokenizer: "Tokenizer", ids: list[int], text: str) -> tuple[np.ndarray, np.ndarray]:
    """The byte offsets in text's UTF-8 where each token's bytes end: with the white space a special
    token that strips took in after it, and without (its own text's end). The tokens' bytes are
    text's but for the spaces a SentencePiece-style tokenizer puts first, which are skipped."""
    pieces_of = tokenizer.__dict__.setdefault("_piece_cache", {})  # id -> bytes: a conversation set reuses them
    pieces = [pieces_of.get(i) for i in ids]
    for j, piece in enumerate(pieces):
        if piece is None:
            pieces[j] = pieces_of[ids[j]] = tokenizer.token_bytes(ids[j])
    data = text.encode("utf-8")
    if b"".join(pieces) == data:  # byte-level: the tokens are the text
        ends = np.cumsum([len(piece) for piece in pieces], dtype=np.int64)
        return ends, ends
    spm = getattr(tokenizer, "_spm", None)
    # special tokens that took in the white space around them (Phi-3's "<|user|>\n"): it is theirs
    strip = {tokenizer._special_tokens[t]: side for t, side in (spm.settings.get("strip", {}) if spm else {}).items()}
    pos, ends, own = 0, np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64)
    for j, piece in enumerate(pieces):
        side = strip.get(ids[j], "")
        if "l" in side:
            pos = _WHITE_SPACE_RUN_UTF8.match(data, pos).end()
        for byte in piece:
            if pos < len(data) and data[pos] == byte:
                pos += 1
            elif byte != 0x20:
                raise ValueError(f"token {ids[j]} ({piece!r}) does not decode to the text at byte {pos}: the "
                                 "assistant's tokens cannot be located")
        own[j] = pos
        if "r" in side:
            pos = _WHITE_SPACE_RUN_UTF8.match(data, pos).end()
        ends[j] = pos
    return ends, own


def hf_stop_ids(folder) -> list[int]:
    """The end-of-sequence ids of a Hugging Face checkpoint folder: generation_config.json's and
    config.json's eos_token_id (an int or a list)."""
    # As transformers' generate: generation_config.json's where it names them (config.json's is then not read:
    # a config.json id the generation config leaves out does not stop transformers), else config.json's.
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(os.fspath(folder), name)
        if os.path.exists(path):
            eos = json.loads(Path(path).read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return sorted(set([eos] if isinstance(eos, int) else list(eos)))
    return []


def hf_prefix_ids(path) -> list[int]:
    """The ids a Hugging Face tokenizer.json's post-processor puts before a single text (Llama 3's
    <|begin_of_text|>; none for GPT-2's): what its models saw at the start of every sequence, for
    prompts to begin with."""
    with open(path, encoding="utf-8") as f:
        post = json.load(f).get("post_processor") or {}
    for step in post.get("processors", [post]) if post.get("type") == "Sequence" else [post]:
        if step.get("type") in ("RobertaProcessing", "BertProcessing"):  # cls $A sep: cls = [token, id]
            return [step["cls"][1]]
        if step.get("type") == "TemplateProcessing":
            ids = []
            for piece in step.get("single", []):
                if "Sequence" in piece:
                    return ids
                ids += step["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
    return []


_SET_OPERATIONS = ("&&", "--", "~~", "||")


def _python_spelling(pattern: str) -> tuple[str, bool]:
    """A pattern in tiktoken's syntax (Rust's regex crate) as Python's `regex` module reads it alike:
    `$` outside a class is the end of the text there (Python's also matches before a final newline:
    " ?[^\\s\\p{L}]+$" took "!\\n" as two pieces): written \\Z; a class with a set operation
    (`&&`, `--`, `~~`, `||`; Kimi K2's "[\\p{Lu}...&&[^\\p{Han}]]") needs `regex`'s version 1 syntax,
    version 0 reading "&&" as two more characters of the class (whose letters then never matched,
    and the text they covered was dropped), as does a class nested in a class (Rust's union,
    "[[^a-z]0-9]", which version 0 reads as other characters); the POSIX classes as Rust's ASCII sets
    (respell_posix: `regex`'s are Unicode). Returns (the pattern, whether it needs version 1)."""
    pattern = respell_posix(pattern, RUST_POSIX)[0]
    v1 = any(depth and (pattern.startswith(_SET_OPERATIONS, i) or (depth >= 2 and piece.startswith("[")))
             for piece, depth, i in regex_pieces(pattern))
    return respell_anchors(pattern, "^", "\\Z"), v1  # ((?m): a line's end in both, left alone)


def _compile_custom(pattern: str):
    """The slow general path for a custom pattern: Python's `regex` module if installed, else `re`;
    the pattern read in tiktoken's syntax (_python_spelling)."""
    try:
        import regex as engine
    except ImportError:  # pragma: no cover - regex is installed in dev/CI
        engine = re
    if pattern == "":
        raise ValueError("pattern must not be empty (use 'gpt2', 'gpt4', 'gpt4o' or a regex)")
    spelled, v1 = _python_spelling(pattern)
    try:
        if v1 and engine is not re:
            # (?-f): Rust's simple case folding under (?i), not version 1's default full folding
            return engine.compile("(?-f)" + spelled, engine.V1)
        return engine.compile(spelled)
    except Exception as e:
        hint = "" if engine is not re else " (install the `regex` package for \\p{..} classes and possessive quantifiers)"
        raise ValueError(
            f"pattern {pattern!r} is neither a built-in name ({', '.join(PATTERNS)}) nor a regex that Python's "
            f"`{engine.__name__}` module compiles: {e}{hint}"
        ) from None


def _check_ids(ids, where: str) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{where}: ids must be a sequence of ints, got {type(ids).__name__}")
    out = []
    for i in ids:
        try:
            i = operator.index(i)  # the C++ decoder takes numpy ints and bools too
        except TypeError:
            raise TypeError(f"{where}: ids must be ints, got an element of type {type(i).__name__}") from None
        if i < 0 or i >= 1 << 32:
            raise _overflow(i)
        out.append(i)
    return out


# UTF-8 continuation bytes: every other byte starts a character.
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def _overflow(i: int) -> TokenIdOverflowError:
    return TokenIdOverflowError(f"unknown token id {i}: out of the range of token ids, [0, 2**32)")


def _invalid(i: int) -> InvalidTokenError:
    return InvalidTokenError(f"Invalid token for decoding: {i} (unknown token id {i})")


# The longest token a vocabulary may hold (csrc/cpu/bpe.h's kMaxTokenBytes): real vocabularies' longest
# are a few hundred bytes.
MAX_TOKEN_BYTES = 1 << 16


def _atomic_write(path, data: bytes) -> None:
    """Writes data to path whole or not at all (data.write_whole: a temp file made exclusively, never
    through a planted link, fsync'd and renamed into place)."""
    from pyllm.data import write_whole

    write_whole(os.path.abspath(path), data)


def _ranks_body(ranks: dict[bytes, int]) -> bytes:
    return "".join(
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ).encode("ascii")


def _parse_ranks_body(body: bytes, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(body.splitlines(), 1):
        if not line:
            continue
        try:
            tok_b64, rank = line.split()
            tok = base64.b64decode(tok_b64, validate=True)
            ranks[tok] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{where}: line {lineno} is not '<base64 token> <rank>': {line[:80]!r}") from None
    return ranks


def _batch_args(texts, num_threads, op: str) -> tuple[list[str], int]:
    """The checked texts (as a list) and thread count (None: the CPUs this process may use)."""
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(f"{op}: texts must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{op}: texts[{k}] must be a str, got {type(t).__name__}")
    return texts, _thread_count(num_threads, op)


def _thread_count(num_threads, op: str) -> int:
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"{op}: num_threads must be a positive int or None, got {num_threads!r}")
    return min(num_threads, 1024)  # (more threads than that only wait; 2^40 overflowed the C++ int)


# --- SentencePiece-style BPE (Llama 2's, Mistral's tokenizer.json) ----------------------------------

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_PREPEND = ("all", "always", "first", "never")
_BEFORE_SPACE = re.compile(f"(?={_SPACE})")


def _settings_bytes(settings: dict) -> bytes:
    return json.dumps(settings, sort_keys=True, ensure_ascii=True).encode("ascii")


class _SentencePieceSettings:
    """Checked settings of a SentencePiece-style Tokenizer (see Tokenizer's sentencepiece argument),
    with what the C++ encoder takes: merges as (left, right, merged) id triples, the 256 byte tokens."""

    def __init__(self, settings: dict, ranks: dict[bytes, int], specials: dict[str, int]):
        keys = {"merges", "prepend", "split", "byte_fallback", "unk", "fuse_unk", "whole_first"}
        if not isinstance(settings, dict) or not keys <= set(settings) <= keys | {"strip"}:
            raise ValueError(f"sentencepiece must be a dict of {sorted(keys)} (and \"strip\"), got "
                             f"{sorted(settings) if isinstance(settings, dict) else type(settings).__name__}")
        strip = settings.get("strip", {})
        if not isinstance(strip, dict) or any(t not in specials or side not in ("l", "r", "lr")
                                              for t, side in strip.items()):
            raise ValueError("sentencepiece['strip'] must map special tokens to 'l', 'r' or 'lr' (the sides whose "
                             f"white space they take in, Hugging Face's lstrip / rstrip), got {strip!r}")
        if settings["prepend"] not in _PREPEND:
            raise ValueError(f"sentencepiece['prepend'] must be one of {', '.join(_PREPEND)}, got {settings['prepend']!r}")
        for name in ("split", "byte_fallback", "fuse_unk", "whole_first"):
            if not isinstance(settings[name], bool):
                raise ValueError(f"sentencepiece[{name!r}] must be a bool, got {settings[name]!r}")
        unk = settings["unk"]
        ids = set(ranks.values()) | set(specials.values())
        if unk is not None and unk not in ids:
            raise ValueError(f"sentencepiece['unk'] must be None or a token id, got {unk!r}")
        piece_of = {i: b for b, i in ranks.items()}
        triples = []
        for k, pair in enumerate(settings["merges"]):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or any(not isinstance(i, int) or i not in piece_of for i in pair)):
                raise ValueError(f"sentencepiece['merges'][{k}] must be [left id, right id] of two pieces, got {pair!r}")
            merged = ranks.get(piece_of[pair[0]] + piece_of[pair[1]])
            if merged is None:
                raise ValueError(f"sentencepiece['merges'][{k}]: {piece_of[pair[0]]!r} + {piece_of[pair[1]]!r} is "
                                 "not a piece of the vocabulary")
            triples += [pair[0], pair[1], merged]
        self.settings = {**settings, "merges": [list(p) for p in settings["merges"]]}
        self.merge_triples = triples
        none = (1 << 32) - 1
        # Byte tokens may be added tokens too (Hugging Face's model vocabulary holds both).
        self.byte_fallback_ids = ([ranks.get(f"<0x{b:02X}>".encode("ascii"), specials.get(f"<0x{b:02X}>", none))
                                   for b in range(256)] if settings["byte_fallback"] else [])
        self.unk_id = none if unk is None else unk
        self.fuse_unk, self.whole_first = settings["fuse_unk"], settings["whole_first"]
        self._table = None

    def pieces(self, segment: str, first: bool, prefix: bool = True) -> list[str]:
        """A text between special tokens as the encoder takes it: spaces as "▁", the prefix "▁" per
        the prepend scheme (first: this segment starts the text; prefix False: none, the segment
        continuing a text before it), cut before each "▁" if split."""
        if not segment:
            return []
        prepend = self.settings["prepend"]
        text = segment.replace(" ", _SPACE)
        if prefix and (prepend == "all" or (prepend != "never" and (prepend == "always" or first)
                                            and not text.startswith(_SPACE))):
            text = _SPACE + text
        if not self.settings["split"]:
            return [text]
        return [p for p in _BEFORE_SPACE.split(text) if p]  # Metaspace: each "▁" starts a piece

    def decode_table(self, tokenizer: "Tokenizer") -> list:
        """id -> the bytes it decodes to ("▁" as a space, <0xXX> as that byte; None for holes)."""
        if self._table is None:
            table: list = [None] * tokenizer.vocab_size
            byte_ids = {i: b for b, i in enumerate(self.byte_fallback_ids) if i != (1 << 32) - 1}
            for piece, i in tokenizer._ranks.items():
                table[i] = piece.replace(_SPACE.encode(), b" ")
            for text, i in tokenizer._special_tokens.items():
                table[i] = text.encode("utf-8")
            for i, b in byte_ids.items():
                table[i] = bytes([b])
            self._table = table
        return self._table


def _hf_merge_pairs(data, where: str) -> list:
    """A tokenizer.json's merges as [left, right] pairs, after checking the parts from_hf reads are
    shaped as tokenizers writes them: a malformed file had failed on "too many values to unpack", a
    KeyError or an AttributeError."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{where}: not a tokenizer.json (a JSON object with a 'model' object)")
    if model.get("type") == "BPE" and not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{where}: the model's vocab must be an object of token -> id")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or any(not isinstance(t, dict) or not isinstance(t.get("content"), str)
                                          or not isinstance(t.get("id"), int) for t in added):
        raise ValueError(f"{where}: added_tokens must be a list of objects with a string 'content' and an int 'id'")
    merges = model.get("merges") or []
    pairs = []
    for merge in merges if isinstance(merges, list) else [merges]:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ValueError(f"{where}: merge {merge!r} is not two tokens ('a b' or [\"a\", \"b\"])")
        pairs.append(pair)
    return pairs


def _check_hf_added_ids(data: dict, where: str) -> None:
    """tokenizers does not read an added token's "id": one in the model's vocabulary gets that id,
    the others the ids after the vocabulary, in the list's order. A file whose ids say otherwise
    had been read at its own ids (silently other ids than tokenizers gives)."""
    vocab = data["model"].get("vocab") or {}
    following = len(vocab)
    for t in data.get("added_tokens") or []:
        expected = vocab.get(t["content"])
        if expected is None:
            expected, following = following, following + 1
        if t["id"] != expected:
            raise NotImplementedError(f"{where}: added token {t['content']!r} has id {t['id']}, but tokenizers gives "
                                      f"it {expected} (the vocabulary's id, else the next after the vocabulary in the "
                                      "list's order)")


class Tokenizer:
    """Byte-level BPE tokenizer, token-identical with tiktoken for the same ranks, pattern and specials.

    Args:
        mergeable_ranks: dict bytes -> rank (id), as tiktoken's; must hold all 256 single bytes.
        pattern: "gpt2", "gpt4" (cl100k), "gpt4o" (o200k) -- each split by a hand-written C++
            pre-tokenizer -- or any other regex string, split with Python's `regex` module (or `re`
            when `regex` is not installed): correct but several times slower, single-threaded.
            The string is read in tiktoken's (Rust) syntax: `$` the end of the text, class set
            operations such as `[\\p{L}&&[^\\p{Han}]]` (Kimi K2's).
            The exact regex strings of the built-ins are recognised as the built-ins.
        special_tokens: dict str -> id; ids must not collide with ranks.
        normalization: None, or a Unicode form ("NFC", "NFD", "NFKC", "NFKD") applied to every text
            before it is encoded, as Hugging Face tokenizers with that normalizer do (Qwen2's: NFC).
            tiktoken has none, so such a tokenizer has no to_tiktoken().
        sentencepiece: None, or the settings of a SentencePiece-style BPE (Llama 2's, Mistral's, as
            Tokenizer.from_hf reads them from a tokenizer.json; pattern is then ignored): the
            ranks map each piece's UTF-8 (spaces written "▁", byte tokens "<0xXX>") to its id;
            keys "merges" (list of [left id, right id], in priority order), "prepend" ("all":
            "▁" before every text between special tokens, as a Prepend normalizer; "always" /
            "first" / "never": as a Metaspace pre-tokenizer's prepend_scheme), "split" (pieces cut
            before each "▁"), "byte_fallback", "unk" (id or None), "fuse_unk", "whole_first"
            (Hugging Face's ignore_merges), and optionally "strip" ({special token: "l", "r" or
            "lr"}: the white space before / after it taken in with it where it is matched, as
            Hugging Face's lstrip / rstrip added tokens: Phi-3's chat tokens). Encoding starts
            from characters, not bytes; decode
            turns "▁" back into spaces and byte tokens into their bytes, and keeps the space
            encode put first (decode(encode(t)) == " " + t with "all" or "always").
        pat_str, explicit_n_vocab: tiktoken.Encoding's keywords (pat_str the pattern; the ranks and
            special tokens must number explicit_n_vocab), with its _pat_str, _mergeable_ranks and
            _special_tokens to read: tiktoken's recipe for extending an encoding runs as it is.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, *, name: str = "pyllm-bpe",
                 normalization: str | None = None, sentencepiece: dict | None = None, pat_str: str | None = None,
                 explicit_n_vocab: int | None = None, matched: Iterable[str] = ()):
        # matched: special tokens matched wherever they are, as Hugging Face matches its added tokens
        # that are not "special" (Qwen2.5's <tool_call>): by encode_ordinary too, never disallowed
        # pat_str, explicit_n_vocab: tiktoken.Encoding's keywords, so that its README's way of extending
        # an encoding (Encoding(name=, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
        # special_tokens={**enc._special_tokens, ...})) runs with pyllm.Tokenizer in its place
        if pat_str is not None:
            if pattern != "gpt4":
                raise TypeError("Tokenizer: give the split regex as pattern or as tiktoken's pat_str, not both")
            pattern = pat_str
        if explicit_n_vocab is not None and explicit_n_vocab != len(mergeable_ranks) + len(special_tokens or {}):
            raise ValueError(f"Tokenizer: explicit_n_vocab={explicit_n_vocab} but the ranks and special tokens "
                             f"number {len(mergeable_ranks) + len(special_tokens or {})}")
        if normalization is not None and normalization not in _UNICODE_FORMS:
            raise ValueError(f"normalization must be None, 'NFC', 'NFD', 'NFKC' or 'NFKD', got {normalization!r}")
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(f"mergeable_ranks must be a dict bytes -> int, got {type(mergeable_ranks).__name__}")
        for tok, rank in mergeable_ranks.items():
            if not isinstance(tok, bytes) or not isinstance(rank, int) or isinstance(rank, bool):
                raise TypeError(f"mergeable_ranks must map bytes to int, got {type(tok).__name__} -> {type(rank).__name__}")
            if rank < 0 or rank >= 1 << 31:
                raise ValueError(f"mergeable_ranks: rank {rank} of {tok!r} is out of range [0, 2**31)")
            if len(tok) > MAX_TOKEN_BYTES:  # (indexing a token is quadratic in its length: a 1 MiB one, minutes)
                raise ValueError(f"mergeable_ranks: the token of rank {rank} is {len(tok):,} bytes, longer than the "
                                 f"{MAX_TOKEN_BYTES:,} a vocabulary's token may be")
        special_tokens = dict(special_tokens or {})
        ranks_used = set(mergeable_ranks.values())
        if len(ranks_used) != len(mergeable_ranks):
            raise ValueError("mergeable_ranks: two tokens share a rank")
        for s, i in special_tokens.items():
            if not isinstance(s, str) or not s:
                raise TypeError(f"special_tokens must map non-empty str to int, got key {s!r}")
            _check_encodable("special_tokens", s)
            if not isinstance(i, int) or isinstance(i, bool) or i < 0 or i >= 1 << 31:
                raise ValueError(f"special token {s!r} has id {i!r}, expected an int in [0, 2**31)")
            if i in ranks_used:
                raise ValueError(f"special token {s!r} has id {i}, which is already the rank of a token")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError("special_tokens: two special tokens share an id")
        if isinstance(matched, str) or not isinstance(matched, Iterable):
            raise TypeError(f"matched must be a collection of special tokens' names, got {matched!r}")
        matched = sorted(set(matched))
        if stray := [m for m in matched if m not in special_tokens]:
            raise ValueError(f"matched names {stray[0]!r}, which is no special token")
        self.name = name
        self.normalization = normalization
        self._ranks = dict(mergeable_ranks)
        self._special_tokens = special_tokens
        self._special_list = list(special_tokens)
        self._special_index = {s: k for k, s in enumerate(self._special_list)}
        self._special_regex_cache: dict = {}
        self._special_ids = frozenset(special_tokens.values())
        self._table: list | None = None  # id -> bytes, built on first use (_token_table)
        self._matched = tuple(matched)
        self._matched_indices = sorted(self._special_index[m] for m in matched)
        self._all_special_indices = sorted(set(range(len(self._special_list))) - set(self._matched_indices))
        self._n_vocab = max([*ranks_used, *special_tokens.values()]) + 1
        count = len(ranks_used) + len(special_tokens)
        if self._n_vocab > 2 * count + (1 << 20):  # the tables hold every id up to the largest (dense):
            # 2**31 - 1 would have asked for ~16 GiB, or failed with a bare bad_alloc
            raise ValueError(f"ids up to {self._n_vocab - 1:,} for {count:,} tokens: pyllm's tokenizer tables are "
                             "dense (every id up to the largest), as tiktoken's and Hugging Face's vocabularies are; "
                             "number the tokens (and special tokens) closer to their count")
        self._cuda_encoder = None
        self._spm = None
        specials_utf8, special_ids = [s.encode("utf-8") for s in self._special_list], list(special_tokens.values())
        if sentencepiece is not None:
            if normalization is not None:
                raise ValueError("a SentencePiece-style tokenizer takes no Unicode normalization")
            self._spm = _SentencePieceSettings(sentencepiece, self._ranks, special_tokens)
            self._pattern_name, self._pattern, self._pattern_code, self._regex = "sentencepiece", None, -1, None
            self._enc = _C.BpeEncoder(list(self._ranks.keys()), list(self._ranks.values()), specials_utf8, special_ids,
                                      self._spm.merge_triples, self._spm.byte_fallback_ids, self._spm.unk_id,
                                      self._spm.fuse_unk, self._spm.whole_first)
            return
        self._pattern_name, self._pattern, self._pattern_code = _resolve_pattern(pattern)
        self._regex = _compile_custom(self._pattern) if self._pattern_code < 0 else None
        self._enc = _C.BpeEncoder(list(self._ranks.keys()), list(self._ranks.values()), self._pattern_code,
                                  specials_utf8, special_ids)

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids: the highest rank or special id + 1 (tiktoken's n_vocab)."""
        return self._n_vocab

    n_vocab = vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special_tokens)

    @property
    def max_token_value(self) -> int:
        return self._n_vocab - 1

    @property
    def eot_token(self) -> int:
        """The id of "<|endoftext|>"; KeyError when it is no special token, as tiktoken (nothing in
        pyllm reads it: data.prepare finds the token by encoding it)."""
        return self._special_tokens["<|endoftext|>"]

    def is_special_token(self, token: int) -> bool:
        if not isinstance(token, int):  # tiktoken asserts; a TypeError says more
            raise TypeError(f"is_special_token: token must be an int, got {type(token).__name__}")
        return token in self._special_ids

    def special_ids(self) -> list[int]:
        """The ids transformers' decode(skip_special_tokens=True) leaves out: the special tokens, not
        the added tokens matched as text ("special": false in a tokenizer.json: Qwen's <think>)."""
        return sorted(i for text, i in self._special_tokens.items() if text not in self._matched)

    def token_byte_values(self) -> list[bytes]:
        """The bytes of every mergeable (non-special) token, sorted bytewise as tiktoken's."""
        if self._spm is None:
            return sorted(self._ranks)
        table = self._token_table()  # "▁" as a space, as decode gives them
        return sorted(table[i] for i in self._ranks.values())

    @property
    def pattern(self) -> str:
        """The split regex (for a built-in, the exact regex its C++ pre-tokenizer implements)."""
        return self._pattern

    @property
    def pattern_name(self) -> str | None:
        return self._pattern_name

    def encodes_in_parts(self) -> bool:
        """Whether a text cut at patterns.SAFE_CUTS[pattern_name] encodes, part by part, to the ids of
        the whole (data.prepare reads a large file so): a built-in pattern, no normalization, and no
        token matched in ordinary text (Tokenizer(matched=)) with a newline, which a cut could split."""
        return (self._pattern_name in PATTERNS and self.normalization is None
                and not any("\n" in token for token in self._matched))

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    # tiktoken.Encoding's private names that its README's recipe for extending an encoding reads
    @property
    def _pat_str(self) -> str:
        return self._pattern

    @property
    def _mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    def __getstate__(self):
        # Pickle as the definition (ranks, pattern, specials), e.g. for DataLoader workers.
        return {"ranks": self._ranks, "pattern": self._pattern, "special_tokens": self._special_tokens,
                "name": self.name, "normalization": self.normalization,
                "sentencepiece": None if self._spm is None else self._spm.settings, "matched": self._matched}

    def __setstate__(self, state):
        self.__init__(state["ranks"], state["pattern"] or "gpt4", state["special_tokens"], name=state["name"],
                      normalization=state.get("normalization"), sentencepiece=state.get("sentencepiece"),
                      matched=state.get("matched", ()))

    def _normalized(self, text: str) -> str:
        return text if self.normalization is None else unicodedata.normalize(self.normalization, text)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"pattern={self._pattern_name or 'custom'!r}, special_tokens={len(self._special_tokens)})")

    # ---------------------------------------------------------------- encoding
    def _split_custom(self, text: str) -> list[str]:
        return [m.group(0) for m in self._regex.finditer(text) if m.group(0)]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encodes text, treating special tokens as ordinary text (but the matched ones, which are
        matched wherever they are, as Hugging Face's non-special added tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"encode_ordinary: text must be a str, got {type(text).__name__}")
        if self._matched:
            return self.encode(text, disallowed_special=())
        text = self._normalized(text)
        if self._spm is not None:
            return self._encode_pieces(self._spm.pieces(_utf8_safe(text), True))
        if self._regex is not None:
            return self._encode_pieces(self._split_custom(_utf8_safe(text)))
        try:
            return self._enc.encode_ordinary(text)
        except TypeError:
            return self._enc.encode_ordinary(_fix_surrogates(text))

    def _encode_continuation(self, text: str, after: str) -> list[int]:
        """encode_ordinary of a text that continues another, after (a prompt's completion): a
        SentencePiece-style tokenizer puts no "▁" before it, which encoded alone it would (a space the
        data does not hold: Llama 2's " Paris." had become "▁", "▁P", ..., where the two texts encoded
        together give "▁P", ...). Where after is empty or ends at a matched token (with the white space
        it takes in), text starts a segment of its own, "▁" and all, as the two encoded together give
        it. Any other tokenizer: encode_ordinary's."""
        if self._spm is None or self.normalization is not None or not after:
            return self.encode_ordinary(text)
        if self._matched:
            strip = self._spm.settings.get("strip", {})
            parts = _split_stripping(self._special_regex(self._matched_indices), _utf8_safe(after), strip)
            if parts[-1] == "" and len(parts) > 1:  # after ends at a matched token: text starts a segment
                if "r" in strip.get(parts[-2], ""):  # (the token takes in the white space text starts with)
                    text = text[_WHITE_SPACE_RUN.match(text).end():]
                if self._spm.settings["prepend"] in ("all", "always"):  # a "▁" after every token
                    return self.encode_ordinary(text)
                # "first" (transformers' LlamaTokenizer, legacy false) / "never": none past the text's start
            return self._encode_custom(text, self._matched_indices, [], continuation=True)
        return self._encode_pieces(self._spm.pieces(_utf8_safe(text), True, prefix=False))

    def _encode_pieces(self, pieces: list[str]) -> list[int]:
        try:
            return self._enc.encode_pieces(pieces)
        except TypeError:
            return self._enc.encode_pieces([_fix_surrogates(p) for p in pieces])

    def _special_args(self, allowed_special, disallowed_special, where: str,
                      none_disallowed: bool = False) -> tuple[list[int], list[int], tuple[str, ...]]:
        """(indices of the allowed special tokens, of the disallowed ones, the disallowed strings that
        are no special token), with tiktoken's rules: an allowed name that is no special token can
        never match, so it is ignored; disallowed strings are looked for in the text whether they are
        special tokens or not, and raise only when found. none_disallowed: disallowed_special=None
        checks nothing, as tiktoken's encode (its encode_batch raises TypeError)."""
        if disallowed_special == "all" and not allowed_special and isinstance(allowed_special, (frozenset, set, tuple, list)):
            # the default, on every call: skip the set algebra
            return self._matched_indices, self._all_special_indices, ()
        if allowed_special == "all":
            allowed = set(self._special_list)
        else:
            if isinstance(allowed_special, str) or not isinstance(allowed_special, Iterable):
                raise TypeError(f"{where}: allowed_special must be 'all' or a collection of str, got {allowed_special!r}")
            allowed = set(allowed_special)
            _check_strs(allowed, "allowed_special", where)
            allowed &= self._special_index.keys()
        others: tuple[str, ...] = ()
        if disallowed_special == "all":
            disallowed = set(self._special_list) - allowed
        elif disallowed_special is None and none_disallowed:
            disallowed = set()
        else:
            if isinstance(disallowed_special, str) or not isinstance(disallowed_special, Iterable):
                raise TypeError(f"{where}: disallowed_special must be 'all' or a collection of str, "
                                f"got {disallowed_special!r}")
            disallowed = set(disallowed_special)
            _check_strs(disallowed, "disallowed_special", where)
            others = tuple(sorted(disallowed - self._special_index.keys()))
            disallowed -= set(others)
        allowed |= set(self._matched)  # (matched wherever they are; never disallowed)
        disallowed -= set(self._matched)
        return (sorted(self._special_index[s] for s in allowed), sorted(self._special_index[s] for s in disallowed),
                others)

    def _encode_normalized(self, texts: list[str], allowed: list[int], disallowed: list[int], others: tuple[str, ...],
                           num_threads: int) -> list[list[int]]:
        """encode_batch for a tokenizer that normalizes, in Hugging Face's order: special tokens are
        found (and disallowed ones refused) in the text as given, and only the text between them is
        normalized, then encoded as ordinary text. Normalizing first had made a special token of
        text that was none (NFKC: fullwidth "<|endoftext|>") and lost one a combining mark after it
        composed into (NFC: ">" + U+0338)."""
        names = [*others, *(self._special_list[d] for d in disallowed)]
        if names:
            _check_disallowed(texts, names)
        cut = self._special_regex(allowed) if allowed else None
        parts = [_split_keeping(cut, t) if cut else [t] for t in texts]  # text, special, text, ... per text
        pieces = [unicodedata.normalize(self.normalization, piece) for split in parts for piece in split[::2]]
        if self._regex is not None:
            encoded = self._encode_custom_batch(pieces, [], [], num_threads)
        else:
            encoded = self._by_encoder(lambda ts, disallowed: self._enc.encode_batch(ts, [], [], num_threads), pieces, [])
        out, k = [], 0
        for split in parts:
            ids = []
            for j, piece in enumerate(split):
                if j % 2:
                    ids.append(self._special_tokens[piece])
                else:
                    ids += encoded[k]
                    k += 1
            out.append(ids)
        return out

    def _checked_in_python(self, texts: list[str], disallowed: list[int], others: tuple[str, ...]) -> list[int]:
        """The disallowed indices left for C++ to check: none once disallowed strings that are no
        special token (which C++ cannot look for) have been looked for here, with the others, so
        that the first in the text is named."""
        if not others:
            return disallowed
        _check_disallowed(texts, [*others, *(self._special_list[d] for d in disallowed)])
        return []

    def _by_encoder(self, encode, texts: list[str], disallowed: list[int]):
        """encode(texts, disallowed) on the C++ encoder, with what each encode call needs around it:
        texts holding lone surrogates (refused with a TypeError) again with them replaced, as tiktoken
        does, their disallowed special tokens looked for before, in the texts as given (as tiktoken
        looks: a special token that the repair makes had been refused), and a disallowed special token
        named as tiktoken names it."""
        try:
            try:
                return encode(texts, disallowed)
            except TypeError:
                if disallowed:
                    _check_disallowed(texts, [self._special_list[d] for d in disallowed])
                return encode([_fix_surrogates(t) for t in texts], [])
        except ValueError as e:
            self._reraise_disallowed(e, texts, disallowed)
            raise

    def _reraise_disallowed(self, error: ValueError, texts: list[str], disallowed: list[int]) -> None:
        """C++ names the first disallowed special token in its own order; tiktoken names the first in
        the text (of the first text holding one). Raises that; returns when error is another one."""
        if disallowed and "disallowed special token" in str(error):
            try:
                _check_disallowed(texts, [self._special_list[d] for d in disallowed])
            except ValueError as ours:
                raise ours from None

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] | None = "all") -> list[int]:
        """Encodes text with tiktoken's special-token rules.

        Special tokens in `allowed_special` ("all" or a set) become their ids. By default
        (disallowed_special="all") text containing any other special token raises ValueError;
        pass disallowed_special=() to encode such text as ordinary text (or None, which tiktoken's
        encode takes as "check nothing" too).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        allowed, disallowed, others = self._special_args(allowed_special, disallowed_special, "encode", True)
        if self.normalization is not None:
            return self._encode_normalized([text], allowed, disallowed, others, 1)[0]
        if others:
            disallowed = self._checked_in_python([text], disallowed, others)
        if self._regex is not None or self._spm is not None:
            return self._encode_custom(text, allowed, disallowed)
        return self._by_encoder(lambda ts, disallowed: self._enc.encode(ts[0], allowed, disallowed), [text], disallowed)

    def encode_to_numpy(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                        disallowed_special: Literal["all"] | Collection[str] | None = "all") -> np.ndarray:
        """encode() as a uint32 numpy array, which the C++ encoder fills without a Python int per token."""
        if not isinstance(text, str):
            raise TypeError(f"encode_to_numpy: text must be a str, got {type(text).__name__}")
        allowed, disallowed, others = self._special_args(allowed_special, disallowed_special, "encode_to_numpy", True)
        if self.normalization is not None:
            return np.array(self._encode_normalized([text], allowed, disallowed, others, 1)[0], dtype=np.uint32)
        disallowed = self._checked_in_python([text], disallowed, others)
        if self._regex is not None or self._spm is not None:
            return np.array(self._encode_custom(text, allowed, disallowed), dtype=np.uint32)
        # one thread: the caller's, as encode()
        return self._by_encoder(lambda ts, disallowed: self._enc.encode_batch_packed(ts, allowed, disallowed, 1)[0], [text],
                                disallowed)

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        """The id of the token that is exactly text_or_bytes, special tokens included; KeyError when
        no token is, as tiktoken. A SentencePiece-style vocabulary's pieces may be given with
        spaces, as decode gives them, or with "▁"."""
        piece = text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else text_or_bytes
        if not isinstance(piece, bytes):
            raise TypeError(f"encode_single_token: expected a str or bytes, got {type(text_or_bytes).__name__}")
        rank = self._ranks.get(piece if self._spm is None else piece.replace(b" ", _SPACE.encode()))
        if rank is not None:
            return rank
        try:
            return self._special_tokens[piece.decode("utf-8")]
        except (UnicodeDecodeError, KeyError):
            raise KeyError(piece) from None

    def _special_regex(self, allowed: list[int]) -> re.Pattern:
        """The allowed special tokens' alternation (longest first), cached per set."""
        key = tuple(allowed)
        special_re = self._special_regex_cache.get(key)
        if special_re is None:
            names = sorted((self._special_list[a] for a in allowed), key=len, reverse=True)
            special_re = self._special_regex_cache[key] = re.compile("|".join(map(re.escape, names)))
        return special_re

    def _encode_custom(self, text: str, allowed: list[int], disallowed: list[int], continuation: bool = False) -> list[int]:
        if disallowed:  # (in the text as given, before its lone surrogates are replaced, as tiktoken looks)
            _check_disallowed([text], [self._special_list[d] for d in disallowed])
        text = _utf8_safe(text)
        if self._spm is None:
            split = lambda segment, first: self._split_custom(segment)  # noqa: E731
        else:  # the text's first segment is the one a "first" prepend scheme marks (none: a continuation's)
            split = lambda segment, first: self._spm.pieces(segment, first, not (first and continuation))  # noqa: E731
        if not allowed:
            return self._encode_pieces(split(text, True))
        out: list[int] = []
        strip = self._spm.settings.get("strip", {}) if self._spm is not None else {}
        # text, special, text, ...: the white space a special token that strips takes in left out
        for j, part in enumerate(_split_stripping(self._special_regex(allowed), text, strip)):
            out += [self._special_tokens[part]] if j % 2 else self._encode_pieces(split(part, j == 0))
        return out

    def _encode_custom_batch(self, texts: list[str], allowed: list[int], disallowed: list[int],
                             num_threads: int) -> list[list[int]]:
        """_encode_custom over texts on Python threads: the C++ merging runs without the GIL (the
        splitting in Python holds it, so a regex pattern gains less than a SentencePiece one)."""
        if num_threads == 1 or len(texts) < 2:
            return [self._encode_custom(t, allowed, disallowed) for t in texts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(num_threads, len(texts))) as pool:
            return list(pool.map(lambda t: self._encode_custom(t, allowed, disallowed), texts))

    def encode_batch(self, texts: Sequence[str] = _UNSET, num_threads: int | None = None, *,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all",
                     device: str = "cpu", text: Sequence[str] = _UNSET) -> list[list[int]]:
        """encode() over many texts, on num_threads threads (None: all cores, where tiktoken's
        default is 8) with the GIL released. text=: tiktoken's name for texts.

        device="cuda": the CUDA batch encoder (same ids), when pyllm was built with CUDA and a GPU is usable.
        """
        texts = _either(texts, text, "encode_batch", "texts", "text")
        texts, num_threads = _batch_args(texts, num_threads, "encode_batch")
        allowed, disallowed, others = self._special_args(allowed_special, disallowed_special, "encode_batch")
        if self.normalization is not None and device in ("cpu", "cuda"):
            # (on the CPU for device="cuda" too: the CUDA encoder would normalize the special tokens'
            # surroundings with them, and its ids are to be the CPU's)
            return self._encode_normalized(texts, allowed, disallowed, others, num_threads)
        if device == "cuda" and self._spm is not None:
            raise NotImplementedError("encode_batch: the CUDA encoder takes byte-level vocabularies, not "
                                      "SentencePiece-style ones; use device='cpu'")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"encode_batch: device must be 'cpu' or 'cuda', got {device!r}")
        disallowed = self._checked_in_python(texts, disallowed, others)
        if device == "cuda":
            from pyllm.tokenizer import cuda_encoder

            try:
                return cuda_encoder.encode_batch(self, texts, allowed, disallowed, num_threads)
            except ValueError as e:
                self._reraise_disallowed(e, texts, disallowed)
                raise
        if self._regex is not None or self._spm is not None:  # (names the first disallowed token itself)
            return self._encode_custom_batch(texts, allowed, disallowed, num_threads)
        return self._by_encoder(lambda ts, disallowed: self._enc.encode_batch(ts, allowed, disallowed, num_threads), texts,
                                disallowed)

    def encode_batch_packed(self, texts: Sequence[str], num_threads: int | None = None, *,
                            allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                            disallowed_special: Literal["all"] | Collection[str] = "all"):
        """encode_batch() as two numpy arrays, for datasets: (ids uint32, offsets int64 of len(texts)+1);
        text k's ids are ids[offsets[k]:offsets[k + 1]]. Skips building a Python int per token."""
        texts, num_threads = _batch_args(texts, num_threads, "encode_batch_packed")
        allowed, disallowed, others = self._special_args(allowed_special, disallowed_special, "encode_batch_packed")
        if self.normalization is not None:  # (it checks the disallowed tokens itself)
            lists = self._encode_normalized(texts, allowed, disallowed, others, num_threads)
        else:
            disallowed = self._checked_in_python(texts, disallowed, others)
            if self._regex is None and self._spm is None:
                return self._by_encoder(lambda ts, disallowed: self._enc.encode_batch_packed(ts, allowed, disallowed, num_threads),
                                        texts, disallowed)
            lists = self._encode_custom_batch(texts, allowed, disallowed, num_threads)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        ids = np.fromiter((i for x in lists for i in x), dtype=np.uint32, count=int(offsets[-1]))
        return ids, offsets

    def encode_ordinary_batch(self, texts: Sequence[str] = _UNSET, num_threads: int | None = None, *,
                              text: Sequence[str] = _UNSET) -> list[list[int]]:
        """encode_ordinary() over many texts, in parallel (num_threads as encode_batch's; text=:
        tiktoken's name for texts)."""
        texts = _either(texts, text, "encode_ordinary_batch", "texts", "text")
        return self.encode_batch(texts, num_threads, disallowed_special=())

    # ---------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Sequence[int] = _UNSET, *, tokens: Sequence[int] = _UNSET) -> bytes:
        """The bytes of the tokens, concatenated (tokens=: tiktoken's name for ids). An unknown id
        raises InvalidTokenError, an id outside [0, 2**32) TokenIdOverflowError: tiktoken's KeyError
        and OverflowError, and ValueErrors both, as pyllm raised before."""
        ids = _either(ids, tokens, "decode_bytes", "ids", "tokens")
        if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"decode_bytes: ids must be a sequence of ints, got {type(ids).__name__}")
        if not isinstance(ids, list):
            ids = list(ids)
        if self._spm is not None:
            table = self._token_table()
            try:
                if ids and min(ids) < 0:
                    raise IndexError
                return b"".join([table[i] for i in ids])  # a hole (None) raises TypeError
            except (IndexError, TypeError):
                self._raise_decode_error(ids, "decode_bytes")
                raise
        try:
            return self._enc.decode_bytes(ids)
        except (TypeError, ValueError):  # a wrong element, or C++'s "unknown token id"
            self._raise_decode_error(ids, "decode_bytes")
            raise

    def _raise_decode_error(self, ids: list, where: str) -> None:
        """Raises tiktoken's kind of error for the first bad element of ids (TypeError, then
        TokenIdOverflowError, for any element, as tiktoken converts them all first, then
        InvalidTokenError); returns when there is none."""
        try:
            ids = _check_ids(ids, where)
        except (TypeError, ValueError) as e:
            raise e from None
        table = self._token_table()
        for i in ids:
            if i >= len(table) or table[i] is None:
                raise _invalid(i) from None

    def _token_table(self) -> list:
        """id -> the bytes it decodes to (None for an id of no token), built on first use: one list
        index per token beats a call into C++ per token."""
        if self._table is None:
            if self._spm is not None:
                table = self._spm.decode_table(self)
            else:
                table = [None] * self._n_vocab
                for piece, i in self._ranks.items():
                    table[i] = piece
                for special, i in self._special_tokens.items():
                    table[i] = special.encode("utf-8")
            self._table = table
        return self._table

    def decode(self, ids: Sequence[int] = _UNSET, errors: str = "replace", *, tokens: Sequence[int] = _UNSET) -> str:
        """The text of the tokens; bytes that are not valid UTF-8 become U+FFFD (errors="replace").
        tokens=: tiktoken's name for ids."""
        return self.decode_bytes(_either(ids, tokens, "decode", "ids", "tokens")).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one token (special tokens: their UTF-8); InvalidTokenError (a KeyError, as
        tiktoken's) when no token has that id."""
        try:
            i = operator.index(token)  # numpy ints too, as tiktoken
        except TypeError:
            raise TypeError(f"decode_single_token_bytes: token must be an int, got {type(token).__name__}") from None
        if not 0 <= i < 1 << 32:
            raise _overflow(i)
        table = self._token_table()
        piece = table[i] if i < len(table) else None
        if piece is None:
            raise _invalid(i)
        return piece

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (special tokens: their UTF-8)."""
        if not isinstance(id, int) or isinstance(id, bool):
            raise TypeError(f"token_bytes: id must be an int, got {type(id).__name__}")
        return self.decode_single_token_bytes(id)

    def decode_tokens_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        """Each token's bytes, for showing how a text was cut."""
        if hasattr(tokens, "tolist"):  # numpy arrays, torch tensors
            tokens = tokens.tolist()
        return [self.decode_single_token_bytes(t) for t in tokens]

    def decode_with_offsets(self, tokens: Sequence[int]) -> tuple[str, list[int]]:
        """(the text, the index in it of each token's first character). A token that starts inside
        a character (with a UTF-8 continuation byte) gets that character's index, as tiktoken's.
        Bytes that are not valid UTF-8 raise UnicodeDecodeError, as tiktoken's (offsets into a
        text with U+FFFD in it would not say where the token's bytes are)."""
        pieces = self.decode_tokens_bytes(tokens)
        offsets, chars = [], 0  # chars: the characters started so far
        for piece in pieces:
            inside = 1 if piece and 0x80 <= piece[0] < 0xC0 else 0
            offsets.append(max(0, chars - inside))
            chars += len(piece.translate(None, _CONTINUATION_BYTES))  # each other byte starts one
        return b"".join(pieces).decode("utf-8"), offsets

    def decode_batch(self, batch: Sequence[Sequence[int]], *, errors: str = "replace",
                     num_threads: int | None = 8) -> list[str]:
        """decode() of each list of ids. num_threads is checked, for tiktoken's signature, but not
        used: decoding copies bytes while holding the GIL, so threads would only take turns."""
        _thread_count(num_threads, "decode_batch")
        return [self.decode(ids, errors) for ids in batch]

    def decode_bytes_batch(self, batch: Sequence[Sequence[int]], *, num_threads: int | None = 8) -> list[bytes]:
        """decode_bytes() of each list of ids (num_threads: as decode_batch's)."""
        _thread_count(num_threads, "decode_bytes_batch")
        return [self.decode_bytes(ids) for ids in batch]

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts, vocab_size: int, pattern: str = "gpt4", special_tokens: Iterable[str] = (),
              show_progress: bool = True, *, num_threads: int | None = None) -> "Tokenizer":
        """Trains a byte-level BPE vocabulary of `vocab_size` ids (special tokens included).

        texts: an iterable of str, or a list of file paths (os.PathLike, or str naming existing files;
        read as UTF-8 with invalid bytes replaced). Ids 0..255 are the bytes, then one id per merge,
        then the special tokens. Merges are learned in C++ over the unique pre-tokenized pieces;
        ties go to the highest count, then the smallest (left id, right id). The texts are cut at the
        special tokens' strings before pre-tokenization: a "<|endoftext|>" between documents is no
        text to learn merges from, and no piece spans it (tokenizers' BpeTrainer learns "<|" and "|>"
        from it, checked 2026-12-04; encoding with allowed_special matches the special whole).

        Raises ValueError when vocab_size < 256 + len(special_tokens), or when the data has fewer
        distinct pairs to merge than vocab_size needs (the message says the largest vocab_size it allows).
        """
        if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool):
            raise TypeError(f"train: vocab_size must be an int, got {type(vocab_size).__name__}")
        vocab_size = int(vocab_size)
        if isinstance(special_tokens, str) or not isinstance(special_tokens, Iterable):
            raise TypeError(f"train: special_tokens must be a collection of str, got {special_tokens!r}")
        if isinstance(special_tokens, (set, frozenset)) and len(special_tokens) > 1:
            raise TypeError("train: special_tokens must be an ordered sequence (a list or tuple: their ids follow its "
                            "order), got a set, whose order changes from run to run")
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise TypeError(f"train: special tokens must be non-empty str, got {s!r}")
            _check_encodable("train: special_tokens", s)
        if len(set(specials)) != len(specials):
            raise ValueError(f"train: special_tokens has duplicates: {specials}")
        if vocab_size < 256 + len(specials):
            raise ValueError(f"train: vocab_size must be at least 256 (the bytes) + {len(specials)} (special tokens) "
                             f"= {256 + len(specials)}, got {vocab_size}")
        name, regex_str, code = _resolve_pattern(pattern)
        custom = _compile_custom(regex_str) if code < 0 else None
        num_threads = _thread_count(num_threads, "Tokenizer.train")

        from tqdm.auto import tqdm

        trainer = _C.BpeTrainer(code)
        # (a special token with a newline might span a cut: such files are read whole)
        cuts = custom is None and not any("\n" in s for s in specials)
        batches, total_bytes = _text_batches(texts, _PART_BYTES if cuts else None, name)
        # Longest first, so that a special token holding another is cut whole.
        special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="bpe: counting pieces",
                  disable=not show_progress) as bar:
            for batch, nbytes in batches:
                if special_re is not None:
                    batch = [piece for t in batch for piece in special_re.split(t) if piece]
                if custom is None:
                    try:
                        trainer.count_texts(batch, num_threads)
                    except TypeError:
                        trainer.count_texts([_fix_surrogates(t) for t in batch], num_threads)
                else:
                    counts = collections.Counter()
                    for t in batch:
                        counts.update(m.group(0) for m in custom.finditer(t) if m.group(0))
                    pieces = list(counts)
                    try:
                        trainer.count_pieces(pieces, list(counts.values()))
                    except TypeError:
                        trainer.count_pieces([_fix_surrogates(p) for p in pieces], list(counts.values()))
                bar.update(nbytes)

        n_merges = vocab_size - 256 - len(specials)
        tokens = [bytes([b]) for b in range(256)]
        chunk = max(1, n_merges // 200)
        with tqdm(total=n_merges, desc="bpe: merging", disable=not show_progress) as bar:
            while len(tokens) - 256 < n_merges:
                want = min(chunk, n_merges - (len(tokens) - 256))
                new = trainer.merge(want)
                for k in range(0, len(new), 2):
                    tokens.append(tokens[new[k]] + tokens[new[k + 1]])
                bar.update(len(new) // 2)
                if len(new) // 2 < want:
                    # (the largest vocab_size that works: its tokens no longer than MAX_TOKEN_BYTES too)
                    got = next((k for k, t in enumerate(tokens) if len(t) > MAX_TOKEN_BYTES), len(tokens)) - 256
                    raise ValueError(
                        f"train: vocab_size={vocab_size} needs {n_merges} merges but the training data allows only "
                        f"{len(tokens) - 256} (no pair of tokens is left to merge): use vocab_size <= "
                        f"{256 + got + len(specials)} or more text")
        longest = max(map(len, tokens))
        if longest > MAX_TOKEN_BYTES:
            raise ValueError(f"train: merging made a token of {longest:,} bytes (a text holds one piece that long, a run "
                             f"of one character), longer than the {MAX_TOKEN_BYTES:,} a token may be: use vocab_size "
                             f"<= {next(k for k, t in enumerate(tokens) if len(t) > MAX_TOKEN_BYTES) + len(specials)} "
                             "or more varied text")
        ranks = {tok: i for i, tok in enumerate(tokens)}
        special_ids = {s: len(tokens) + k for k, s in enumerate(specials)}
        return cls(ranks, regex_str if name is None else name, special_ids)

    # ---------------------------------------------------------------- files
    def save(self, path) -> None:
        """Writes one file: a magic line, a JSON header (pattern, special tokens, count and SHA-256
        of the ranks) and the ranks in tiktoken's format. Atomic: a temp file renamed into place."""
        body = _ranks_body(self._ranks)
        header = {
            "name": self.name, "pattern": self._pattern, "pattern_name": self._pattern_name,
            "special_tokens": self._special_tokens, "n_ranks": len(self._ranks),
            "sha256": hashlib.sha256(body).hexdigest(), **({"normalization": self.normalization} if self.normalization else {}),
            **({"matched": list(self._matched)} if self._matched else {}),
        }
        if self._spm is not None:  # its merges are checksummed with the ranks
            header["sentencepiece"] = self._spm.settings
            header["sha256"] = hashlib.sha256(body + _settings_bytes(self._spm.settings)).hexdigest()
        header["header_sha256"] = _header_digest(header)
        _atomic_write(path, (_MAGIC + "\n" + json.dumps(header, ensure_ascii=True) + "\n").encode("ascii") + body)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Reads a file written by save(). Raises ValueError on a corrupt or truncated file."""
        with open(path, "rb") as f:
            data = f.read()
        where = f"Tokenizer.load({os.fspath(path)!r})"
        magic, _, rest = data.partition(b"\n")
        if magic.decode("ascii", "replace").strip() != _MAGIC:
            raise ValueError(f"{where}: not a pyllm tokenizer file (first line {magic[:40]!r}, expected "
                             f"{_MAGIC!r}); for a tiktoken rank file use Tokenizer.load_tiktoken")
        header_line, newline, body = rest.partition(b"\n")
        try:
            header = json.loads(header_line)
            pattern, specials, n_ranks, digest = (header["pattern"], header["special_tokens"], header["n_ranks"],
                                                  header["sha256"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where}: corrupt or truncated file (the header line is not valid)") from None
        spm = header.get("sentencepiece")
        if "header_sha256" in header and _header_digest(header) != header["header_sha256"]:  # (files before it: none)
            raise ValueError(f"{where}: corrupt file (its header does not match its SHA-256: the pattern, special "
                             "tokens or normalization were changed)")
        if not newline or hashlib.sha256(body + (b"" if spm is None else _settings_bytes(spm))).hexdigest() != digest:
            raise ValueError(f"{where}: corrupt or truncated file (the ranks do not match the header's SHA-256)")
        ranks = _parse_ranks_body(body, where)
        if len(ranks) != n_ranks:
            raise ValueError(f"{where}: corrupt file ({len(ranks)} ranks, the header says {n_ranks})")
        return cls(ranks, pattern or "gpt4", specials, name=header.get("name", "pyllm-bpe"),
                   normalization=header.get("normalization"), sentencepiece=spm, matched=header.get("matched", ()))

    def save_tiktoken(self, path) -> None:
        """Writes the ranks as a tiktoken .tiktoken file (base64 token, space, rank per line), atomically.
        The pattern and special tokens are not part of that format."""
        self._no_tiktoken("save_tiktoken")
        _atomic_write(path, _ranks_body(self._ranks))

    @classmethod
    def load_tiktoken(cls, path, pattern: str = "gpt4", special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """Reads a tiktoken .tiktoken rank file; pattern and special tokens are given by the caller."""
        with open(path, "rb") as f:
            data = f.read()
        return cls(_parse_ranks_body(data, f"Tokenizer.load_tiktoken({os.fspath(path)!r})"), pattern, special_tokens)

    @classmethod
    def from_hf(cls, path) -> "Tokenizer":
        """A Hugging Face tokenizer.json of a byte-level BPE (GPT-2's, and those of tiktoken's kind:
        ranks = ids, merges in id order): its vocabulary, split pattern, Unicode normalization and
        added tokens (as special tokens: encode(text, allowed_special="all") splits them out as
        Hugging Face does; plain encode_ordinary does not, but for those the file says are not
        "special", Qwen2.5's <tool_call>: matched everywhere, as tokenizers matches them, never
        disallowed; Tokenizer(matched=)). Added ids other than tokenizers assigns are refused. What tiktoken's semantics cannot
        reproduce (other normalizers, a prefix space, word suffixes, merges out of id order, other
        models or pre-tokenizers) raises NotImplementedError, naming it.

        Or a SentencePiece-style BPE (Llama 2's, TinyLlama's, Mistral's: spaces as "▁" through a
        Prepend + Replace normalizer or a Metaspace pre-tokenizer, characters as the starting
        symbols, byte fallback or <unk>, merges in their own list's order): see the sentencepiece
        argument of Tokenizer. A folder (as LLM.from_hf takes) means its tokenizer.json."""
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "tokenizer.json")):
                raise FileNotFoundError(f"Tokenizer.from_hf({os.fspath(path)!r}): the folder has no tokenizer.json")
            path = os.path.join(path, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        where = f"Tokenizer.from_hf({os.fspath(path)!r})"
        merge_pairs = _hf_merge_pairs(data, where)
        model = data["model"]
        if model.get("type") != "BPE":
            raise NotImplementedError(f"{where}: a {model.get('type')!r} model; only BPE")
        for name in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(name):
                raise NotImplementedError(f"{where}: {name} {model[name]!r} is not supported")
        added = data.get("added_tokens") or []
        # transformers 5's GemmaTokenizer rebuilds its own pipeline whatever the file's normalizer and
        # pre-tokenizer (a file without the Replace normalizer had been refused here, read there): the
        # class's settings, all of them _transformers_class_pipeline's
        config = _tokenizer_config(path)
        config = {**config, "tokenizer_class": _transformers_tokenizer_class(path, config)}
        spm = {} if config.get("tokenizer_class") in _GEMMA_TOKENIZER_CLASSES else _hf_sentencepiece(data, where)
        for t in added:
            if t.get("single_word") or ((t.get("lstrip") or t.get("rstrip")) and spm is None):
                raise NotImplementedError(f"{where}: added token {t['content']!r} "
                                          + ("matches whole words only" if t.get("single_word") else
                                             "strips the white space around it (taken by SentencePiece-style "
                                             "tokenizers alone here)"))
        _check_hf_added_ids(data, where)
        specials = {t["content"]: t["id"] for t in added}
        # tokenizers matches every added token wherever it is, "special" or not (add_special_tokens=False
        # leaves out the post-processor's alone); a "special": false one (Qwen2.5's <tool_call>) had been
        # spelled byte by byte by encode_ordinary, which data preparation and prompts use
        matched = [t["content"] for t in added if not t.get("special", False)]
        name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        if spm is not None:
            spm = _transformers_class_pipeline(config, spm)
            return cls._from_hf_sentencepiece(data, spm, specials, merge_pairs, where, name, matched)
        normalizer = data.get("normalizer") or {}
        steps = _flat_normalizers(normalizer)  # DeepSeek-V3's empty Sequence: none; Sequence([NFC]): NFC
        normalization = steps[0].get("type") if len(steps) == 1 else None
        if len(steps) > 1 or (steps and normalization not in _UNICODE_FORMS):
            raise NotImplementedError(f"{where}: normalizer {normalizer!r} has no tiktoken equivalent (only the "
                                      "Unicode forms NFC, NFD, NFKC, NFKD are applied)")
        if normalization is not None:  # tokenizers matches "normalized" added tokens in the normalized text,
            # pyllm in the text as given: alike for ASCII ones under NFC / NFD (a combining mark aside)
            for t in added:
                if t.get("normalized") and not (normalization in ("NFC", "NFD") and t["content"].isascii()):
                    raise NotImplementedError(f"{where}: added token {t['content']!r} is matched in the "
                                              f"{normalization}-normalized text by tokenizers, here in the text as given")
        pattern = _hf_pattern(data.get("pre_tokenizer"), where)
        byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        ranks = {}
        for token, token_id in model["vocab"].items():
            if token in specials:
                continue
            if any(ch not in byte_of for ch in token):
                raise NotImplementedError(f"{where}: token {token!r} is not in the byte-level alphabet")
            ranks[bytes(byte_of[ch] for ch in token)] = token_id
        last, made = -1, set()
        for left, right in merge_pairs:
            merged = model["vocab"].get(left + right)
            if merged is None or merged < last:  # several splits of one token may follow each other
                raise NotImplementedError(f"{where}: merge {left!r} + {right!r} makes no token or is out of id "
                                          "order: tiktoken's semantics (lowest id merges first) would encode differently")
            last = merged
            made.add(merged)
        # A token no merge makes: Hugging Face reaches it only as a whole piece (ignore_merges), where
        # tiktoken's rule merges into it anywhere its bytes' halves are tokens (a hand-extended vocabulary).
        unmade = next((t for t, i in ranks.items() if len(t) > 1 and i not in made), None)
        if unmade is not None:
            raise NotImplementedError(f"{where}: token {unmade!r} (id {ranks[unmade]}) is made by no merge: tiktoken's "
                                      "semantics would merge into it where Hugging Face's merge list does not")
        return cls(ranks, pattern, specials, name=name, normalization=normalization, matched=matched)

    @classmethod
    def _from_hf_sentencepiece(cls, data: dict, spm: dict, specials: dict[str, int], merge_pairs: list,
                               where: str, name: str, matched: Sequence[str] = ()) -> "Tokenizer":
        model = data["model"]
        for t in data.get("added_tokens") or []:
            if t.get("normalized") and data.get("normalizer"):
                raise NotImplementedError(f"{where}: added token {t['content']!r} is matched in the normalized text")
        vocab = model["vocab"]
        ranks = {piece.encode("utf-8"): i for piece, i in vocab.items() if piece not in specials}
        merges = []
        for left, right in merge_pairs:
            if left not in vocab or right not in vocab:
                raise ValueError(f"{where}: merge {left!r} + {right!r} names a token that is not in the vocabulary")
            merges.append([vocab[left], vocab[right]])
        unk = model.get("unk_token")
        if unk is not None and unk not in vocab and not model.get("byte_fallback"):
            # (Hugging Face refuses such a file's text at the first unknown character; it had been dropped)
            raise ValueError(f"{where}: unk_token {unk!r} is not in the vocabulary")
        settings = {"merges": merges, "byte_fallback": bool(model.get("byte_fallback")),
                    "unk": vocab.get(unk) if unk is not None else None, "fuse_unk": bool(model.get("fuse_unk")),
                    "whole_first": bool(model.get("ignore_merges")), **spm}  # (spm: a class's settings win)
        # Phi-3's chat tokens take in the white space after them (rstrip): "<|user|>\n" is the token alone
        strip = {t["content"]: "l" * bool(t.get("lstrip")) + "r" * bool(t.get("rstrip"))
                 for t in data.get("added_tokens") or [] if t.get("lstrip") or t.get("rstrip")}
        if strip:
            settings["strip"] = strip
        return cls(ranks, special_tokens=specials, name=name, sentencepiece=settings, matched=matched)

    def to_hf(self, path) -> None:
        """Writes a Hugging Face tokenizer.json that tokenizers (and transformers' fast tokenizers)
        encode id for id as this one does: the vocabulary in GPT-2's byte alphabet, every split of
        every token into two tokens as a merge, grouped by the token's rank (as transformers converts
        tiktoken's files), ignore_merges (a piece that is a token is that token, tiktoken's first
        rule), the split regex then ByteLevel, the Unicode normalization, special tokens as added
        tokens. Byte-level tokenizers only: a SentencePiece-style one came from a tokenizer.json."""
        if self._spm is not None:
            raise ValueError("to_hf: a SentencePiece-style tokenizer was read from a tokenizer.json; use that file")
        char = _bytes_to_unicode()
        text = lambda token: "".join(char[b] for b in token)  # noqa: E731
        ranks = self._ranks
        spelled = {text(token) for token in ranks}
        clash = sorted(t for t in self._special_tokens if t in spelled)
        if clash:  # one vocabulary entry for two ids: tokenizers would encode that text as the special token
            raise ValueError(f"to_hf: the special token(s) {clash} are spelled as ordinary tokens are in the "
                             "tokenizer.json's byte alphabet; give special tokens text no byte-level token has "
                             "(<|...|> as usual)")
        merges = []
        for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
            splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
            merges += [[text(a), text(b)] for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
        data = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": t not in self._matched}
                             for t, i in sorted(self._special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": {"type": self.normalization} if self.normalization else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                # from_hf reads this spelling back as the built-in it is (patterns.SPELLINGS).
                # A custom pattern's ^ / $ (the text's start / end in tiktoken's syntax) as \A / \z:
                # Oniguruma's bare ones are a line's ("\s+$" had split "a\n  \n  b" otherwise); its
                # POSIX classes as their ASCII sets (Oniguruma's are Unicode).
                {"type": "Split", "pattern": {"Regex": hf_spelling(
                    self._pattern if self.pattern_name
                    else respell_anchors(respell_posix(self._pattern, RUST_POSIX)[0], r"\A", r"\z"))},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      # the special tokens too, at their ids: tokenizers appends an added token missing
                      # from the vocabulary after it, whatever its "id" says (cl100k's and o200k's
                      # specials lie past gaps: they had been renumbered)
                      "vocab": {**{text(t): i for t, i in sorted(ranks.items(), key=lambda kv: kv[1])},
                                **{t: i for t, i in sorted(self._special_tokens.items(), key=lambda kv: kv[1])}},
                      "merges": merges},
        }
        _atomic_write(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def from_tiktoken(cls, encoding) -> "Tokenizer":
        """The same tokenizer as a tiktoken.Encoding (its ranks, pattern and special tokens)."""
        try:
            ranks, pat, specials = encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens
        except AttributeError:
            raise TypeError(f"from_tiktoken: expected a tiktoken.Encoding, got {type(encoding).__name__}") from None
        return cls(dict(ranks), pat, dict(specials), name=encoding.name)

    def to_tiktoken(self, name: str | None = None):
        """A tiktoken.Encoding with the same ranks, pattern and special tokens (needs tiktoken)."""
        self._no_tiktoken("to_tiktoken")
        if self.normalization:
            raise ValueError(f"to_tiktoken: this tokenizer normalizes its texts ({self.normalization}), which tiktoken "
                             "cannot do: its ids would differ on text that is not in that form")
        import tiktoken

        return tiktoken.Encoding(name=name or self.name, pat_str=self._pattern, mergeable_ranks=self._ranks,
                                 special_tokens=self._special_tokens)

    def _no_tiktoken(self, where: str) -> None:
        if self._spm is not None:
            raise ValueError(f"{where}: a SentencePiece-style tokenizer (characters, byte fallback, merges in a "
                             "list of their own) has no tiktoken equivalent")

    # ---------------------------------------------------------------- testing aids
    def split(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of text (what the pattern's regex findall would give; for a
        SentencePiece-style tokenizer, the text with its spaces as "▁", cut where it cuts)."""
        if not isinstance(text, str):
            raise TypeError(f"split: text must be a str, got {type(text).__name__}")
        if self._spm is not None:
            return self._spm.pieces(text, True)
        if self._regex is not None:
            return self._split_custom(text)
        return split_builtin(self._pattern_code, text)


def split_builtin(code: int, text: str) -> list[str]:
    """Pieces of text under the built-in pre-tokenizer `code` (0 gpt2, 1 gpt4, 2 gpt4o)."""
    data = text.encode("utf-8")
    ends = _C.bpe_pretokenize(code, data)
    out, start = [], 0
    for end in ends:
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def _looks_like_file(t) -> bool:
    if isinstance(t, os.PathLike):
        return True
    return isinstance(t, str) and 0 < len(t) < 4096 and "\n" not in t and os.path.isfile(t)


def _looks_like_path(t) -> bool:
    """A short line that reads as a file's path: a folder in it, or a file's extension, no spaces."""
    return (isinstance(t, str) and 0 < len(t) < 4096 and not any(c.isspace() for c in t)
            and (os.sep in t or "/" in t or re.fullmatch(r"[^.]+(\.[^.]+)*\.[A-Za-z][A-Za-z0-9]{0,5}", t) is not None))


def _text_batches(texts, part_bytes: int | None = None, pattern: str = "gpt2"):
    """(generator of (list of str, bytes), total bytes or None): texts in batches of ~32 MB; files
    larger than part_bytes (not None) in parts (patterns.file_parts)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"train: texts must be an iterable of str or a list of file paths, got {type(texts).__name__}")
    # A list of paths is known by its first item; a later one naming no file is a typo (it had
    # trained on the path strings as text), not a text.
    if isinstance(texts, (list, tuple)) and texts and _looks_like_file(texts[0]):
        missing = next((t for t in texts if not _looks_like_file(t)), None)
        if missing is not None:
            raise FileNotFoundError(f"train: texts is a list of file paths ({os.fspath(texts[0])!r} first), but "
                                    f"{str(missing)[:80]!r} names no file: give every path of an existing file, "
                                    "or every text")
        paths = [os.fspath(t) for t in texts]
        total = sum(os.path.getsize(p) for p in paths)

        def read():
            not_utf8: dict = {}  # (said, as prepare says it: merges of U+FFFD had been learned silently)
            for p in paths:
                yield from (text for text, _ in text_parts(p, part_bytes, pattern, not_utf8))
            if not_utf8:
                import warnings

                warnings.warn(f"train: {len(not_utf8)} file(s) are not UTF-8 ({next(iter(not_utf8))} first): their "
                              "other bytes were read as U+FFFD; convert them first (iconv -f cp1252 -t utf-8 ...)",
                              stacklevel=3)

        source = read()
    else:
        if isinstance(texts, (list, tuple)) and texts:  # a list of paths whose first (or only) names no file
            head = texts[:64]  # (its first items tell: no stat call for each of a million texts)
            named = next((t for t in head if _looks_like_file(t)), None)
            if named is not None or all(_looks_like_path(t) for t in head):
                raise FileNotFoundError(
                    f"train: texts looks like a list of file paths, but {str(texts[0])[:80]!r} names no file"
                    + (f" (where {os.fspath(named)!r} does)" if named is not None else "")
                    + ": give every path of an existing file; to train on such strings as text, give an iterator "
                    "(iter(texts))")
        total = sum(len(t) for t in texts if isinstance(t, str)) if isinstance(texts, (list, tuple)) else None
        source = iter(texts)
        if not isinstance(texts, (list, tuple)):  # an iterator of paths (glob.iglob) had trained on the paths' text
            first = next(source, None)
            if first is not None and _looks_like_file(first):
                raise TypeError(f"train: texts is an iterator whose first item names a file ({os.fspath(first)!r}): "
                                "give file paths as a list (list(glob.iglob(...))), texts as any iterable")
            source = itertools.chain([] if first is None else [first], source)

    def batches():
        batch, size = [], 0
        for k, t in enumerate(source):
            if not isinstance(t, str):
                raise TypeError(f"train: texts must be str (or file paths), got {type(t).__name__} at position {k}")
            batch.append(t)
            size += len(t)
            if size >= _COUNT_BATCH_BYTES:
                yield batch, size
                batch, size = [], 0
        if batch:
            yield batch, size

    return batches(), total
