"""A word-level chat tokenizer (ChatML template, "\\n" as its own token) and a tiny Llama sized for it,
so the SFT tests can name every token position they expect to be a target."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "[UNK]",
    "<pad>",
    "<s>",
    "<|im_start|>",
    "<|im_end|>",
    "\n",
    "system",
    "user",
    "assistant",
    "review",
    ":",
    "is",
    "it",
    "positive",
    "or",
    "negative",
    "?",
    "great",
    "good",
    "fine",
    "bad",
    "awful",
    "the",
    "a",
    "plot",
    "food",
    "was",
    "kind",
    "answer",
    "with",
    "one",
    "word",
    "hi",
    "hello",
]


def chat_tokenizer(template: str | None = CHATML):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), "isolated"), pre_tokenizers.Split(Regex(" +"), "removed")]
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = template
    return tok


def tiny_llama(vocab: int, seed: int = 0, attn: str = "sdpa"):
    from ..conftest import make_tiny

    return make_tiny("llama", "causal", seed=seed, vocab_size=vocab, attn_implementation=attn, pad_token_id=1)


def save_chat_model(path: Path) -> Path:
    tok = chat_tokenizer()
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chats(n: int) -> list[dict]:
    """Sentiment Q/A chats: a user asks about a review, the assistant answers in one word."""
    good, bad = ["great", "good", "fine"], ["bad", "awful"]
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        word = (good if pos else bad)[i % (3 if pos else 2)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "answer with one word"},
                    {"role": "user", "content": f"review : the food was {word} . is it positive or negative ?"},
                    {"role": "assistant", "content": "positive" if pos else "negative"},
                ]
            }
        )
    return rows
