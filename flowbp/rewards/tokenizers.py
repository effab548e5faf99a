"""Tokenizers of the reward models, loaded from a weights folder or the hub cache (never downloaded unasked)."""

from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path
from typing import Any

from flowbp.rewards.weights import HubSource, RewardWeightsError, hub_snapshot

CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: open_clip ViT-H-14's tokenizer in transformers format (PickScore's processor, HPSv2's tokenizer).
LAION_H14 = HubSource("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ("tokenizer*", "vocab.json", "merges.txt",
                                                                "special_tokens_map.json"))
BERT_BASE = HubSource("google-bert/bert-base-uncased", ("vocab.txt", "tokenizer.json", "tokenizer_config.json"))
BERT_BASE_LEGACY = HubSource("bert-base-uncased", BERT_BASE.files)  # caches made before the org rename


_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")  # ftfy's uncurl_quotes sets
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "ſt",
              "\ufb06": "st"}
_WIDTH = {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
          if len(unicodedata.normalize("NFKC", chr(c))) == 1} | {0x3000: " "}


def open_clip_clean(text: str) -> str:
    """open_clip's text cleaning before BPE, the parts that matter for prompts.

    open_clip runs ``ftfy.fix_text`` (whose defaults uncurl quotes, undo Latin ligatures and
    full-width forms, NFC-normalise, and repair mojibake), then ``html.unescape`` twice, then
    collapses whitespace. transformers' CLIP tokenizer does the whitespace, NFC and lower-casing but
    none of the rest; this adds them (all but mojibake repair) so HPSv2 sees open_clip's token ids.
    """
    text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
    text = "".join(_LIGATURES.get(ch, ch) for ch in text).translate(_WIDTH)
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return " ".join(text.split())


def has_clip_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
        or (folder / BPE_FILE).is_file()
    )


def clip_tokenizer(folder: Path | None, reward: str, fallback: HubSource | None = LAION_H14,
                   allow_download: bool = False) -> Any:
    """A CLIPTokenizer from ``folder`` (transformers files or open_clip's BPE file), else ``fallback``'s cache."""
    from transformers import CLIPTokenizer

    candidates = [folder] if folder is not None else []
    if fallback is not None and not (folder is not None and has_clip_tokenizer(folder)):
        cached = hub_snapshot(fallback, allow_download)
        if cached is not None:
            candidates.append(cached)
    for c in candidates:
        if not has_clip_tokenizer(c):
            continue
        if (c / "tokenizer.json").is_file() or (c / "vocab.json").is_file():
            tok = CLIPTokenizer.from_pretrained(str(c))
        else:
            from flowbp.rewards.convert import clip_vocab_from_bpe

            vocab, merges = clip_vocab_from_bpe(c / BPE_FILE)
            tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
        # open_clip and CLIP use a context of 77; some saved tokenizers leave model_max_length at 1e30
        if tok.model_max_length > 77:
            tok.model_max_length = 77
        return tok
    where = f"{folder}" if folder is not None else "the weights folder"
    hub = f" or the hub cache of hf.co/{fallback.repo_id}" if fallback is not None else ""
    raise RewardWeightsError(
        f"{reward}: no CLIP tokenizer in {where}{hub}; expected tokenizer.json, vocab.json + merges.txt, "
        f"or open_clip's {BPE_FILE}"
    )


def bert_tokenizer(folder: Path | None, reward: str, allow_download: bool = False) -> Any:
    """BLIP's tokenizer: bert-base-uncased + ``[DEC]`` (bos) + ``[ENC]``, as ImageReward's ``init_tokenizer``."""
    from transformers import BertTokenizer

    candidates = [folder] if folder is not None else []
    if folder is None or not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        for source in (BERT_BASE, BERT_BASE_LEGACY):
            cached = hub_snapshot(source, allow_download and source is BERT_BASE)
            if cached is not None:
                candidates.append(cached)
    for c in candidates:
        if c.is_dir() and ((c / "vocab.txt").is_file() or (c / "tokenizer.json").is_file()):
            tok = BertTokenizer.from_pretrained(str(c))
            # ImageReward appends these two (ids 30522, 30523 for bert-base-uncased: vocab_size 30524);
            # prompts never contain them, but keeping them makes the vocabulary identical.
            if "[DEC]" not in tok.get_vocab():
                tok.add_special_tokens({"bos_token": "[DEC]"})
                tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            return tok
    raise RewardWeightsError(
        f"{reward}: no BERT tokenizer (vocab.txt) in {folder or 'the weights folder'} or the hub cache of "
        f"hf.co/{BERT_BASE.repo_id}"
    )
