"""The embedded word-level tokenizer of the ``tiny`` preset, built as a real HF tokenizer.

Every number 0..99 and every word of the synthetic task is one token, so a response is a
few dozen tokens. The vocabulary is fixed by construction (specials, then numbers, then
words in the order below), which is what makes the special ids below stable; the
tokenizer is saved with ``save_pretrained`` next to the shipped checkpoints and loaded with
``AutoTokenizer.from_pretrained`` like any other.
"""

from __future__ import annotations

PAD, UNK, BOS, EOS, EOT, MASK, START = (
    "<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|mask|>", "<|start|>",
)
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, EOT, MASK, START]
MAX_NUMBER = 99

NAMES = ["ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "leo"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "stamps", "shells"]
WORDS = (
    NAMES + ITEMS
    + ["she", "he", "has", "buys", "finds", "gets", "gives", "away", "loses", "sells", "more",
       "doubles", "triples", "the", "then", "how", "many", "now", "?", ".", "+", "-", "*", "=",
       "start", "we", "have", "add", "take", "so", "answer", "is", "####", "user", "assistant",
       "system"]
)
VOCAB: list[str] = SPECIAL_TOKENS + [str(n) for n in range(MAX_NUMBER + 1)] + WORDS
VOCAB_SIZE = len(VOCAB)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID, UNK_ID, BOS_ID, EOS_ID, EOT_ID, MASK_ID, START_ID = (TOKEN_ID[t] for t in SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start|> {{ message['role'] }} "
    "{{ message['content'] }} <|eot|> {% endfor %}{% if add_generation_prompt %}<|start|> assistant {% endif %}"
)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :data:`VOCAB` with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=[EOT, START],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(path: str) -> None:
    build_tokenizer().save_pretrained(path)
