"""Regenerate the offline demo assets in this directory (deterministic, seeded).

    python automodel_cli/assets/demo/make_demo_assets.py [OUT_DIR]

Why this task: ``automodel finetune demo`` must show learning on a fresh CPU-only machine
with no network in about a minute. Reversing short strings ("reverse: abcde\n" -> "edcba") is
trivial to score, impossible to solve from the prompt's surface statistics alone (so a falling
loss means the model really attends to the right positions) and needs only a ~60-symbol
character vocabulary, which keeps a 2-layer Llama tiny and fast.

Outputs (all small text files; weights are never shipped, the recipe initialises them from
``config.json``):

- ``train.jsonl`` / ``eval.jsonl``: prompt/completion rows, eval strings disjoint from train.
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``chat_template.jinja``: a character-level ``tokenizers`` WordLevel model with
  ``<s> </s> <pad> <unk>`` and chat role tokens, loadable by ``AutoTokenizer.from_pretrained``.
- ``config.json``: a 2-layer ``LlamaConfig`` whose vocabulary and special ids match.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

SEED = 1234
N_TRAIN = 4000
N_EVAL = 200
LETTERS = "abcdefghij"
MIN_LEN, MAX_LEN = 3, 7

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Every other symbol is one character; inputs are lower-cased first, anything else is <unk>.
CHARACTERS = list(string.ascii_lowercase) + list(string.digits) + list(" \n.,:;?!'\"-()/+=*_#%")

# `{% generation %}` marks the trained assistant tokens for `return_assistant_tokens_mask`;
# templates without it work too (the data pipeline then derives the spans from prefixes).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    # Packed batches are only masked per document when no KV cache is built (see
    # components/data/packing.py); generation still passes use_cache=True explicitly.
    use_cache=False,
)


def make_samples(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Distinct random strings, split into disjoint train and eval sets."""
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < N_TRAIN + N_EVAL:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    rows = [{"prompt": f"reverse: {w}\n", "completion": w[::-1]} for w in words]
    return rows[:N_TRAIN], rows[N_TRAIN:]


def build_tokenizer():
    """A character-level fast tokenizer (WordLevel over single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHAT_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS + CHAT_TOKENS)
    # Like Llama: encode(..., add_special_tokens=True) prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def write_assets(out: Path) -> None:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_samples()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(out / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(out)
    # transformers 5 writes its own backend class name; name the class that every supported
    # release (>= 4.57) resolves, so `AutoTokenizer.from_pretrained(out)` works everywhere.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    # Older transformers releases read special tokens from this file; newer ones ignore it.
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    config = LlamaConfig(
        vocab_size=len(hf_tok),
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        **MODEL_CONFIG,
    )
    config.save_pretrained(out)


if __name__ == "__main__":
    write_assets(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
