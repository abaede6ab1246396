"""Write Amazon kitchen reviews as sentiment chats (a `messages` JSONL) for examples/llm_chat_sft.yaml.

    python examples/make_chat_data.py          # -> examples/data/amazon_chat/{train,val}.jsonl

With ``--target DOMAIN`` it writes the data of examples/llm_da_sentiment.yaml (domain
adaptation from the ``--domain`` reviews to the target's):

    python examples/make_chat_data.py --domain books --target kitchen --out examples/data/amazon_da
    # -> train.jsonl, val.jsonl (books chats), target.jsonl (kitchen prompts: the user turn only,
    #    unlabeled), target_test.jsonl (kitchen test chats with their answers, for evaluation)

In that mode the rows are exactly those of the study (benchmarks/causal_da/encode.py, one home for
the prompt): the user turn "Review: <first 64 tokens>\n\nIs this review positive or negative? Answer
with one word.", the study's 800-review subsets of the source and target train splits, and a target
row is the user turn alone: peftadapt renders it with the chat template's generation prompt and no
answer. The review is cut with SmolLM2's tokenizer (``--tokenizer``, default examples/data/smollm2-135m).

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (the Amazon loader, the study's prompt)
from benchmarks.amazon.data import load_split

HERE = Path(__file__).resolve().parent
QUESTION = "Is this product review positive or negative? Answer with one word."
WORDS = 40


def chat(text: str, label: int | None, tok=None) -> dict:
    """One chat; ``label=None``: the user turn alone (an unlabeled target prompt); ``tok``: the study's prompt."""
    if tok is not None:  # lazy: the study's prompt, only in --target mode
        from benchmarks.causal_da.encode import ANSWERS, messages

        answer = [] if label is None else [{"role": "assistant", "content": ANSWERS[label]}]
        return {"messages": [*messages(text, tok), *answer]}
    review = " ".join(text.split()[:WORDS])
    answer = [] if label is None else [{"role": "assistant", "content": "positive" if label else "negative"}]
    return {"messages": [{"role": "user", "content": f"{QUESTION}\n\nReview: {review}"}, *answer]}


def balanced(reviews: list, n: int) -> list:
    """The first n reviews, half of each class, interleaved."""
    pos = [r for r in reviews if r.label == 1][: n // 2]
    neg = [r for r in reviews if r.label == 0][: n - n // 2]
    return [r for pair in zip(pos, neg, strict=False) for r in pair]


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {path} ({len(rows)} chats)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "data" / "amazon_chat")
    ap.add_argument("--domain", default="kitchen")
    ap.add_argument("--train", type=int, default=96, help="train chats (balanced, from the train split)")
    ap.add_argument("--val", type=int, default=32, help="validation chats (balanced, from the test split)")
    ap.add_argument("--target", default=None, help="a target domain: also write its unlabeled prompts (DA)")
    ap.add_argument("--target-test", type=int, default=32, help="target test chats (balanced, from its test split)")
    ap.add_argument("--tokenizer", default=str(HERE / "data" / "smollm2-135m"), help="cuts reviews (--target mode)")
    args = ap.parse_args(argv)
    split = load_split(args.domain)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target is None:
        for name, reviews, n in (("train", split.train, args.train), ("val", split.test, args.val)):
            write(args.out / f"{name}.jsonl", [chat(r.text, r.label) for r in balanced(reviews, n)])
        return
    from transformers import AutoTokenizer

    from benchmarks.causal_da.encode import TRAIN_PER_CLASS, study_subset  # lazy: --target mode only

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    target = load_split(args.target)
    # the study's rows: its 800 source chats, its 800 unlabeled target prompts (user turn only)
    write(args.out / "train.jsonl", [chat(r.text, r.label, tok) for r in study_subset(split.train, TRAIN_PER_CLASS)])
    write(args.out / "val.jsonl", [chat(r.text, r.label, tok) for r in balanced(split.test, args.val)])
    write(args.out / "target.jsonl", [chat(r.text, None, tok) for r in study_subset(target.train, TRAIN_PER_CLASS)])
    write(args.out / "target_test.jsonl", [chat(r.text, r.label, tok) for r in balanced(target.test, args.target_test)])


if __name__ == "__main__":
    main()
