"""A data owner's local text, tokenized on the owner and cut into training sequences.

The text never leaves the device: the daemon reads it with :func:`load_texts`, tokenizes it
with the model's tokenizer and packs it into an :class:`OwnerDataset`, whose batches feed
the first stage (``input_ids``, ``attention_mask``) and the loss on the last (``labels``).

Packing, in order:

1. every document is tokenized without special tokens and followed by the tokenizer's EOS
   token (when it has one), so the model sees where one document ends and the next begins;
2. the documents' tokens are concatenated into one stream and cut into blocks of
   ``seq_len`` tokens; a block may span two documents (plain causal attention across the
   EOS, as in GPT-2 pretraining);
3. the last, shorter block is dropped (``last_block="drop"``, the default) or padded to
   ``seq_len`` with ``attention_mask`` 0 and ``labels`` -100 (``last_block="pad"``);
4. the blocks are split into training and validation blocks by a seeded permutation, so a
   validation block is never trained on.

Batches come in an order fixed by ``(seed, epoch)``: two processes holding the same text,
tokenizer and settings see the same batches in the same order, which is what lets split
training be compared with centralized training step by step.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataSettings",
    "OwnerDataset",
    "TokenBatch",
    "load_texts",
    "tokenize_texts",
]

#: File suffixes :func:`load_texts` reads inside a folder.
TEXT_SUFFIXES = (".txt", ".jsonl")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\r?\n[ \t]*)+")
LastBlock = Literal["drop", "pad"]


# --------------------------------------------------------------------------- reading text


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it with iconv or save it as UTF-8") from error


def _txt_documents(path: Path, paragraphs: bool) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n")
    if not paragraphs:
        return [text] if text.strip() else []
    return [part.strip() for part in _BLANK_LINES.split(text) if part.strip()]


def _jsonl_documents(path: Path) -> list[str]:
    documents: list[str] = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not valid JSON ({error.msg}); every line must be one object like "
                '{"text": "..."}'
            ) from error
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f'{path}:{number}: needs a string "text" field, got {line[:80]!r}; every line must be one '
                'object like {"text": "..."}'
            )
        if text.strip():
            documents.append(text)
    return documents


def _file_documents(path: Path, paragraphs: bool) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    if path.suffix == ".txt":
        return _txt_documents(path, paragraphs)
    raise ValueError(f"{path} is neither a .txt nor a .jsonl file; rename it or point at a folder of such files")


def load_texts(path: str | os.PathLike[str], *, paragraphs: bool = False) -> list[str]:
    """The documents in ``path``: a ``.txt`` file, a ``.jsonl`` file, or a folder of them.

    - ``.txt``: the whole file is one document; with ``paragraphs=True`` every block of
      text between blank lines is one document.
    - ``.jsonl``: one JSON object per line with a string ``"text"`` field; blank lines are
      skipped, anything else is a ``ValueError`` naming the file and line.
    - a folder: every ``.txt`` and ``.jsonl`` file below it, recursively, in sorted order of
      their relative paths (so every machine reads the same documents in the same order).

    Documents holding only whitespace are skipped. No documents at all is a ``ValueError``.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise ValueError(f"{root} holds no .txt or .jsonl files; put the owner's text there")
        documents = [doc for file in files for doc in _file_documents(file, paragraphs)]
    elif root.is_file():
        documents = _file_documents(root, paragraphs)
    else:
        raise ValueError(f"data path {root} does not exist; point the client's data setting at a .txt, .jsonl or folder")
    if not documents:
        raise ValueError(f"{root} holds no text (every document is empty); add some text to train on")
    return documents


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """One token stream: each document's ids (no special tokens), then EOS when the tokenizer has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    # verbose=False: documents longer than the model's context are expected, packing cuts them.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
    return stream


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSettings:
    """How an owner's text becomes training sequences (the same on every owner of a run)."""

    seq_len: int = 128  # tokens per sequence (T)
    val_fraction: float = 0.1  # share of the sequences held out for validation, in [0, 1)
    seed: int = 0  # fixes the train/validation split and the batch order of every epoch
    last_block: LastBlock = "drop"  # the last, shorter block: "drop" it, or "pad" it (mask 0, label -100)
    paragraphs: bool = False  # .txt files: one document per blank-line-separated paragraph, not per file

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (a label needs a token before it), got {self.seq_len!r}")
        if not (isinstance(self.val_fraction, int | float) and 0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.last_block not in ("drop", "pad"):
            raise ValueError(f"last_block must be 'drop' or 'pad', got {self.last_block!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenBatch:
    """One batch of packed sequences."""

    input_ids: Tensor  # (B, T) int64 token ids; padding positions hold the pad (or EOS) id
    attention_mask: Tensor  # (B, T) int64, 1 for tokens, 0 for padding
    labels: Tensor  # (B, T) int64, the input ids with -100 at padding (the loss shifts them)

    @property
    def num_targets(self) -> int:
        """Tokens the loss counts: valid labels after the one-position shift."""
        return int((self.labels[:, 1:] != -100).sum())


class OwnerDataset:
    """An owner's packed sequences, split into training and validation, in a seeded order."""

    def __init__(self, token_ids: Sequence[int], *, settings: DataSettings, pad_id: int = 0) -> None:
        """Pack ``token_ids`` (one stream, as :func:`tokenize_texts` returns) per ``settings``.

        ``pad_id`` fills the padded tail when ``last_block="pad"``; it is masked, so any id
        in the vocabulary works.
        """
        self.settings = settings
        blocks, lengths = _pack(token_ids, settings.seq_len, settings.last_block, pad_id)
        n = blocks.shape[0]
        if n == 0:
            raise ValueError(
                f"the text gives {len(token_ids)} tokens, fewer than one sequence of seq_len={settings.seq_len}; "
                "add text, lower seq_len, or set last_block='pad'"
            )
        n_val = math.ceil(n * settings.val_fraction) if settings.val_fraction > 0 else 0
        if n_val >= n:
            raise ValueError(
                f"the text gives {n} sequence(s) of {settings.seq_len} tokens: too few to hold out "
                f"val_fraction={settings.val_fraction} and keep one to train on; add text or lower seq_len"
            )
        order = np.random.default_rng([settings.seed, 0]).permutation(n)  # epochs use [seed, 1, epoch]
        # Sorted, so the sequences of each split keep the text's order before shuffling.
        val_index = np.sort(order[:n_val])
        train_index = np.sort(order[n_val:])
        self._train, self._train_lengths = blocks[train_index], lengths[train_index]
        self._val, self._val_lengths = blocks[val_index], lengths[val_index]

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, *, settings: DataSettings) -> OwnerDataset:
        """Tokenize ``texts`` with ``tokenizer`` (any Hugging Face tokenizer) and pack them."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        return cls(tokenize_texts(texts, tokenizer), settings=settings, pad_id=int(pad) if pad is not None else 0)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], tokenizer: Any, *, settings: DataSettings) -> OwnerDataset:
        """:func:`load_texts` then :meth:`from_texts`."""
        return cls.from_texts(load_texts(path, paragraphs=settings.paragraphs), tokenizer, settings=settings)

    @property
    def num_samples(self) -> int:
        """Training sequences: this owner's weight when copies are averaged."""
        return int(self._train.shape[0])

    @property
    def num_validation(self) -> int:
        """Held-out sequences."""
        return int(self._val.shape[0])

    @property
    def train_sequences(self) -> Tensor:
        """(N_train, T) int64, in text order (a copy)."""
        return self._train.clone()

    @property
    def validation_sequences(self) -> Tensor:
        """(N_val, T) int64, in text order (a copy)."""
        return self._val.clone()

    def batches_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        _check_batch_size(batch_size)
        whole, rest = divmod(self.num_samples, batch_size)
        return whole + (1 if rest and not drop_last else 0)

    def batches(
        self, batch_size: int, *, epoch: int = 0, shuffle: bool = True, drop_last: bool = False
    ) -> Iterator[TokenBatch]:
        """One epoch of training batches, shuffled by ``(seed, epoch)`` unless ``shuffle=False``.

        The last batch is smaller when ``batch_size`` does not divide the sequences, unless
        ``drop_last``.
        """
        _check_batch_size(batch_size)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._epoch_batches(batch_size, epoch if shuffle else None, drop_last, first=0)

    def stream(self, batch_size: int, *, start: int = 0, drop_last: bool = False) -> Iterator[TokenBatch]:
        """Training batches without end: epoch 0, 1, 2, ... as :meth:`batches`, from batch ``start``.

        Batch ``k`` of the stream is the same whatever ``start`` was, so a run that does
        ``s`` steps per round resumes round ``r`` with ``start=r * s``.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        per_epoch = self.batches_per_epoch(batch_size, drop_last=drop_last)
        if per_epoch == 0:
            raise ValueError(
                f"batch_size={batch_size} with drop_last leaves no batch of {self.num_samples} sequences; "
                "lower batch_size"
            )
        return self._endless(batch_size, drop_last, *divmod(start, per_epoch))

    def validation_batches(self, batch_size: int) -> Iterator[TokenBatch]:
        """The held-out sequences in text order; the last batch may be smaller."""
        _check_batch_size(batch_size)
        return (
            _batch(self._val[first : first + batch_size], self._val_lengths[first : first + batch_size])
            for first in range(0, self.num_validation, batch_size)
        )

    def _endless(self, batch_size: int, drop_last: bool, epoch: int, first: int) -> Iterator[TokenBatch]:
        while True:
            yield from self._epoch_batches(batch_size, epoch, drop_last, first=first)
            epoch, first = epoch + 1, 0

    def _epoch_batches(self, batch_size: int, epoch: int | None, drop_last: bool, *, first: int) -> Iterator[TokenBatch]:
        """Batches ``first, first + 1, ...`` of an epoch; ``epoch=None`` keeps text order."""
        count = self.batches_per_epoch(batch_size, drop_last=drop_last)
        if epoch is None:
            order = np.arange(self.num_samples)
        else:
            order = np.random.default_rng([self.settings.seed, 1, epoch]).permutation(self.num_samples)
        for b in range(first, count):
            index = order[b * batch_size : (b + 1) * batch_size]
            yield _batch(self._train[index], self._train_lengths[index])


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _pack(token_ids: Sequence[int], seq_len: int, last_block: LastBlock, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(blocks (N, T) int64, lengths (N,) int64)``: the stream cut into ``seq_len`` blocks."""
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    whole = ids.numel() // seq_len
    blocks = ids[: whole * seq_len].reshape(whole, seq_len)
    lengths = torch.full((whole,), seq_len, dtype=torch.int64)
    tail = ids[whole * seq_len :]
    if last_block == "pad" and tail.numel() > 0:
        padded = torch.full((1, seq_len), pad_id, dtype=torch.int64)
        padded[0, : tail.numel()] = tail
        blocks = torch.cat([blocks, padded])
        lengths = torch.cat([lengths, torch.tensor([tail.numel()])])
    return blocks, lengths


def _batch(sequences: Tensor, lengths: Tensor) -> TokenBatch:
    """A batch from (B, T) sequences whose first ``lengths[b]`` tokens are real."""
    positions = torch.arange(sequences.shape[1])  # (T,)
    attention_mask = (positions[None, :] < lengths[:, None]).to(torch.int64)  # (B, T)
    labels = sequences.masked_fill(attention_mask == 0, -100)
    return TokenBatch(input_ids=sequences.clone(), attention_mask=attention_mask, labels=labels)
