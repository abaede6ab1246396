"""The Amazon multi-domain loader (benchmarks/amazon/data.py) on the real files."""

from collections import Counter

import pytest

from benchmarks.amazon.data import (
    DOMAINS,
    default_root,
    load_domain,
    load_split,
    parse_reviews,
    source_validation,
    stratified_split,
)

pytestmark = pytest.mark.skipif(
    not (default_root() / "books").is_dir(), reason=f"Amazon multi-domain data not found at {default_root()}"
)


@pytest.fixture(scope="module")
def splits():
    return {d: load_split(d) for d in DOMAINS}


def test_counts_and_labels_agree_with_ratings():
    for d in DOMAINS:
        reviews = load_domain(d)
        assert Counter(r.label for r in reviews) == {0: 1000, 1: 1000}, d
        assert len({r.uid for r in reviews}) >= 1990, d  # ids are (nearly) unique: no block parsed twice
        # the label comes from the file name; the rating agrees (4-5 positive, 1-2 negative)
        assert all(r.rating >= 4 for r in reviews if r.label == 1), d
        assert all(r.rating <= 2 for r in reviews if r.label == 0), d
        assert all(r.text for r in reviews)


def test_first_review_parsed_in_full():
    r = next(x for x in load_domain("books") if x.label == 1)
    assert r.title == "One of the best Crichton novels"
    assert r.text.startswith("Sphere by Michael Crichton is an excellant novel.")
    assert r.text.endswith("I would strongly recommend this book")
    assert r.rating == 5.0


def test_split_is_stratified_disjoint_and_fixed(splits):
    for d, s in splits.items():
        assert len(s.train) == 1600 and len(s.test) == 400
        assert Counter(r.label for r in s.train) == {0: 800, 1: 800}
        assert Counter(r.label for r in s.test) == {0: 200, 1: 200}
        assert {id(r) for r in s.train}.isdisjoint({id(r) for r in s.test})
        again = load_split(d)
        assert [r.uid for r in again.test] == [r.uid for r in s.test]  # deterministic
        assert [r.text for r in again.train] == [r.text for r in s.train]
    # different domains get different shuffles (the seed includes the domain)
    a, b = stratified_split([0] * 10 + [1] * 10, 3, 1), stratified_split([0] * 10 + [1] * 10, 3, 2)
    assert a != b


def test_source_validation_is_stratified(splits):
    fit, val = source_validation(splits["books"].train)
    assert len(fit) == 1400 and len(val) == 200
    assert Counter(r.label for r in val) == {0: 100, 1: 100}
    assert {id(r) for r in fit}.isdisjoint({id(r) for r in val})
    _fit2, val2 = source_validation(splits["books"].train)
    assert [r.uid for r in val2] == [r.uid for r in val]


def test_entities_unescaped_and_raw_ampersand_survives():
    raw = (
        "<reviews>\n<review>\n<unique_id>\nx1\n</unique_id>\n<rating>\n5.0\n</rating>\n<title>\nPots &amp; pans\n"
        "</title>\n<review_text>\nSalt & pepper, &quot;great&quot; &#45; really &lt;3\n</review_text>\n</review>\n"
        "</reviews>\n"
    )
    (r,) = parse_reviews(raw, 1)
    assert r.title == "Pots & pans"
    assert r.text == 'Salt & pepper, "great" - really <3'
    # on the real files: &quot; is frequent in the raw books reviews, and gone after parsing
    raw_books = (default_root() / "books" / "positive.review").read_text(encoding="utf-8")
    assert raw_books.count("&quot;") > 100
    assert sum("&quot;" in r.text for r in load_domain("books")) == 0
    assert sum('"' in r.text for r in load_domain("books")) > 100


def test_bad_domain_names_the_choices():
    with pytest.raises(ValueError, match="valid domains"):
        load_domain("toys")
