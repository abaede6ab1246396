"""Loader and fixed splits for the Amazon multi-domain sentiment reviews (Blitzer et al., ACL 2007).

The files are pseudo-XML (raw ``&`` in values, HTML entities such as ``&quot;``),
so a strict XML parser fails on them. We read them leniently: each
``<review> ... </review>`` block is cut out with a regular expression, the
``title`` and ``review_text`` values are taken between their tags, and HTML
entities are unescaped with :func:`html.unescape` (which leaves a bare ``&``
alone). The label comes from the file name: positive.review -> 1,
negative.review -> 0.

Splits (the protocol of the issue): per domain a stratified 1600 train / 400
test split (800 + 200 per class) with a fixed seed; the source train can be
split further into a stratified train / validation part for model selection.
Nothing here trains on anything; the data is read in place, never copied.
"""

from __future__ import annotations

import html
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("books", "dvd", "electronics", "kitchen")
LABEL_FILES = (("negative.review", 0), ("positive.review", 1))
SPLIT_SEED = 20070601  # fixed for every run and every profile
TEST_PER_CLASS = 200   # 400 test reviews per domain, 1600 train

# <review>...</review> blocks, and one field value between its own tags.
_REVIEW = re.compile(r"<review>(.*?)</review>", re.S)
_FIELD = {
    name: re.compile(rf"<{name}>\s*(.*?)\s*</{name}>", re.S) for name in ("title", "review_text", "rating", "unique_id")
}


def default_root() -> Path:
    """``../shared/data/amazon-multidomain`` relative to the project root (env ``AMAZON_DATA`` overrides)."""
    env = os.environ.get("AMAZON_DATA")
    if env:
        return Path(env)
    project = Path(__file__).resolve().parents[2]
    return project.parent / "shared" / "data" / "amazon-multidomain"


@dataclass(frozen=True)
class Review:
    text: str       # review_text, entities unescaped, whitespace collapsed
    title: str
    label: int      # 1 positive, 0 negative (from the file name)
    rating: float
    uid: str


def _clean(s: str) -> str:
    return " ".join(html.unescape(s).split())


def parse_reviews(raw: str, label: int) -> list[Review]:
    """Parse one pseudo-XML ``*.review`` file's text into reviews (lenient; raw ``&`` is fine)."""
    out = []
    for block in _REVIEW.findall(raw):
        fields = {}
        for name, rx in _FIELD.items():
            m = rx.search(block)
            fields[name] = m.group(1) if m else ""
        text = _clean(fields["review_text"])
        if not text:
            raise ValueError(f"review {fields['unique_id']!r} has no review_text")
        rating = float(fields["rating"]) if fields["rating"].strip() else float("nan")
        out.append(Review(text=text, title=_clean(fields["title"]), label=label, rating=rating,
                          uid=fields["unique_id"].strip()))
    return out


def load_domain(domain: str, root: str | os.PathLike | None = None) -> list[Review]:
    """All 2000 reviews of one domain: negatives first, then positives, in file order."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {list(DOMAINS)}")
    folder = Path(root) if root is not None else default_root()
    if not (folder / domain).is_dir():
        raise FileNotFoundError(
            f"no folder {folder / domain}; set AMAZON_DATA or pass root= (the folder holding {list(DOMAINS)})"
        )
    reviews: list[Review] = []
    for fname, label in LABEL_FILES:
        raw = (folder / domain / fname).read_text(encoding="utf-8")
        reviews += parse_reviews(raw, label)
    return reviews


def stratified_split(labels: list[int], n_holdout_per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, holdout): ``n_holdout_per_class`` of each label go to holdout.

    Deterministic for a given seed (``random.Random``, independent of numpy/torch
    versions); both lists are sorted.
    """
    rng = random.Random(seed)
    keep, hold = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        if n_holdout_per_class > len(idx):
            raise ValueError(f"class {c} has {len(idx)} examples, cannot hold out {n_holdout_per_class}")
        rng.shuffle(idx)
        hold += idx[:n_holdout_per_class]
        keep += idx[n_holdout_per_class:]
    return sorted(keep), sorted(hold)


@dataclass
class DomainSplit:
    domain: str
    train: list[Review]   # 1600 (800 per class)
    test: list[Review]    # 400 (200 per class): never trained on


def load_split(domain: str, root=None) -> DomainSplit:
    """The fixed stratified 1600 / 400 split of one domain."""
    reviews = load_domain(domain, root)
    train_idx, test_idx = stratified_split([r.label for r in reviews], TEST_PER_CLASS,
                                           SPLIT_SEED + DOMAINS.index(domain))
    return DomainSplit(domain, [reviews[i] for i in train_idx], [reviews[i] for i in test_idx])


def source_validation(
    train: list[Review], n_per_class: int = 100, seed: int = SPLIT_SEED
) -> tuple[list[Review], list[Review]]:
    """Split a source train set into (fit, validation), stratified; used only for model selection."""
    keep, hold = stratified_split([r.label for r in train], n_per_class, seed + 1)
    return [train[i] for i in keep], [train[i] for i in hold]
