"""Write Amazon kitchen reviews as sentiment chats (a `messages` JSONL) for examples/llm_chat_sft.yaml.

    python examples/make_chat_data.py          # -> examples/data/amazon_chat/{train,val}.jsonl

Reads the reviews in place from ../shared/data/amazon-multidomain (env AMAZON_DATA
overrides; see benchmarks/amazon/data.py) and writes one chat per line:

    {"messages": [{"role": "user", "content": "Is this review ... ?\\n\\nReview: ..."},
                  {"role": "assistant", "content": "positive"}]}

Train chats come from the kitchen domain's fixed train split, validation chats
from its test split; reviews are cut to their first WORDS words so that two or
three chats fit into one packed row of 256 tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.amazon.data import load_split

HERE = Path(__file__).resolve().parent
QUESTION = "Is this product review positive or negative? Answer with one word."
WORDS = 40


def chat(text: str, label: int) -> dict:
    review = " ".join(text.split()[:WORDS])
    return {
        "messages": [
            {"role": "user", "content": f"{QUESTION}\n\nReview: {review}"},
            {"role": "assistant", "content": "positive" if label else "negative"},
        ]
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "data" / "amazon_chat")
    ap.add_argument("--domain", default="kitchen")
    ap.add_argument("--train", type=int, default=96, help="train chats (balanced, from the train split)")
    ap.add_argument("--val", type=int, default=32, help="validation chats (balanced, from the test split)")
    args = ap.parse_args(argv)
    split = load_split(args.domain)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, reviews, n in (("train", split.train, args.train), ("val", split.test, args.val)):
        pos = [r for r in reviews if r.label == 1][: n // 2]
        neg = [r for r in reviews if r.label == 0][: n - n // 2]
        rows = [chat(r.text, r.label) for pair in zip(pos, neg, strict=False) for r in pair]
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {args.out / (name + '.jsonl')} ({len(rows)} chats)")


if __name__ == "__main__":
    main()
