"""Byte-level BPE tokenizer trained on the corpus with HuggingFace `tokenizers`.

- Digits are split one per token (`Digits(individual_digits=True)` before the byte-level step), so
  "43" is always "4" "3" and numeric answers are spelled the same way everywhere.
- Byte-level: every string, in any script, encodes, and decode(encode(s)) == s exactly.
- Special tokens: EOT "<|endoftext|>" has id 0 and PAD "<pad>" has id 1. No token is added on
  encode; the packer puts EOT between documents. Text never produces the special ids: tokenizers
  from `train_tokenizer`/`load_tokenizer` encode a literal "<|endoftext|>" in text as ordinary
  bytes (`encode_special_tokens`, which tokenizers does not save, so load with `load_tokenizer`),
  and the corpus builder also removes such literals from documents.
- Training is deterministic for the same texts in the same order and the same vocab size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hiermem.io import atomic_path

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
EOT_ID = 0
PAD_ID = 1
MIN_VOCAB_SIZE = 256 + 2 + 1  # the byte alphabet, the two special tokens, at least one merge


def _checked(texts: Iterable[str], stats: dict) -> Iterator[str]:
    """Pass texts through, rejecting non-strings and strings that cannot be UTF-8 encoded."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: text #{i} is {type(text).__name__}, expected str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"train_tokenizer: text #{i} cannot be encoded as UTF-8 "
                             f"({e.reason} at character {e.start}); expected valid Unicode text") from None
        stats["texts"] += 1
        stats["chars"] += len(text)
        yield text


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with individual-digit pre-tokenization."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: Path,
                    progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens on `texts`; save it to `out_path` (atomically)."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"train_tokenizer: vocab_size must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(256 bytes + 2 special tokens + merges), got {vocab_size!r}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    stats = {"texts": 0, "chars": 0}
    tok.train_from_iterator(_checked(texts, stats), trainer=trainer)
    if stats["chars"] == 0:
        raise ValueError(f"train_tokenizer: no text to train on ({stats['texts']} texts, all "
                         f"empty); expected a non-empty corpus")
    if tok.get_vocab_size() < vocab_size:
        log.info("tokenizer: corpus supports only %d of the %d requested tokens",
                 tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID and tok.token_to_id(PAD_TOKEN) == PAD_ID
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tok.save(str(tmp))
    tok.encode_special_tokens = True
    return tok


def _read(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer file {str(path)!r} is not a valid tokenizers JSON file: {e}") from e


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `train_tokenizer`, checking the special-token ids."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist (train it with "
                                f"train_tokenizer or build the corpus first)")
    tok = _read(path)
    if tok.token_to_id(EOT_TOKEN) != EOT_ID or tok.token_to_id(PAD_TOKEN) != PAD_ID:
        raise ValueError(f"tokenizer {str(path)!r}: expected {EOT_TOKEN} = id {EOT_ID} and "
                         f"{PAD_TOKEN} = id {PAD_ID}")
    tok.encode_special_tokens = True  # literal special-token strings in text stay plain text
    return tok


END_OF_TEXT_NAMES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")  # Hugging Face families


def base_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of `DataConfig.tokenizer`: the file itself, or the one in a model directory."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"invalid config field 'tokenizer': expected a tokenizer.json or a model directory "
                                f"holding one, got {str(path)!r}")
    return file


def load_base_tokenizer(path: str | Path) -> tuple[Tokenizer, int, int]:
    """A pretrained model's tokenizer: its `tokenizer.json` (the file, or the model directory holding it),
    with the end-of-text id (the `eos_token` of `tokenizer_config.json` beside it, else the first of
    `END_OF_TEXT_NAMES` the vocabulary has) and the padding id (its `pad_token`, else end-of-text)."""
    file = base_tokenizer_file(path)
    tok = _read(file)
    named: dict = {}
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        for key, value in json.loads(config.read_text()).items():
            if key in ("eos_token", "pad_token"):
                named[key] = value.get("content") if isinstance(value, dict) else value
    ids = [tok.token_to_id(name) for name in (named.get("eos_token"), *END_OF_TEXT_NAMES) if name]
    eot = next((i for i in ids if i is not None), None)
    if eot is None:
        raise ValueError(f"tokenizer {str(file)!r} has no end-of-text token (looked for the eos_token of "
                         f"tokenizer_config.json and {', '.join(END_OF_TEXT_NAMES)})")
    pad = tok.token_to_id(named["pad_token"]) if named.get("pad_token") else None
    tok.encode_special_tokens = True  # literal special-token strings in text stay plain text
    return tok, eot, eot if pad is None else pad


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as an int32 array (no special tokens added). Runs in parallel Rust."""
    encodings = tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of a token-id sequence (the exact inverse of `encode_batch` for one text)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
