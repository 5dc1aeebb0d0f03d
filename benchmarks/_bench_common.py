"""Shared fixtures for the fine-tuning benchmarks: a tiny Llama, its tokenizer and SFT data.

Everything is built locally (no hub access) and deterministically from a seed, so two runs of a
benchmark, and the two trainers inside one benchmark, see byte-identical inputs.

- ``build_tokenizer``: a byte-level BPE tokenizer trained with the ``tokenizers`` library on
  synthetic text, saved as a Hugging Face tokenizer directory. Its post-processor prepends
  ``<s>`` (as Llama tokenizers do); ``</s>`` is EOS and ``<pad>`` a dedicated pad token.
- ``build_model``: a randomly initialised ``LlamaForCausalLM`` saved with ``save_pretrained``
  (safetensors) next to the tokenizer.
- ``build_sft_data``: prompt/completion JSONL whose lengths vary widely (log-uniform), so that
  padding, and how a trainer batches samples, matters.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _lexicon(rng: random.Random, size: int) -> list[str]:
    """``size`` distinct pseudo-words of 1-4 consonant-vowel syllables."""
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.choice((1, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(("", "", "n", "r", "s"))
                          for _ in range(syllables)))
    return sorted(words)


class TextSampler:
    """Zipf-distributed pseudo-words with punctuation: text a BPE tokenizer can learn a rich
    vocabulary from, and whose token count per word varies (frequent words are one token)."""

    def __init__(self, seed: int, lexicon_size: int = 30000):
        rng = random.Random(seed)
        self.words = _lexicon(rng, lexicon_size)
        rng.shuffle(self.words)
        weights = [1.0 / (rank + 1) ** 1.05 for rank in range(lexicon_size)]
        total = sum(weights)
        self.cumulative = []
        running = 0.0
        for weight in weights:
            running += weight / total
            self.cumulative.append(running)

    def words_(self, rng: random.Random, n: int) -> list[str]:
        import bisect

        out = []
        for _ in range(n):
            index = min(bisect.bisect_left(self.cumulative, rng.random()), len(self.words) - 1)
            out.append(self.words[index])
        return out

    def sentence_text(self, rng: random.Random, n_words: int) -> str:
        words = self.words_(rng, n_words)
        pieces = []
        for i, word in enumerate(words):
            if i == 0 or pieces[-1].endswith("."):
                word = word.capitalize()
            if rng.random() < 0.08 and i < len(words) - 1:
                word += ","
            elif rng.random() < 0.07 or i == len(words) - 1:
                word += "."
            pieces.append(word)
        return " ".join(pieces)


def build_tokenizer(directory: Path, sampler: TextSampler, seed: int, corpus_lines: int = 20000) -> None:
    """Train a byte-level BPE tokenizer of exactly ``VOCAB_SIZE`` tokens and save it (HF format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [sampler.sentence_text(rng, rng.randint(5, 60)) for _ in range(corpus_lines)]
    corpus += ["### Instruction:", "### Response:"] * 100
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"BPE learned {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}; "
                           "add corpus lines")
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=4096,
    )
    fast.save_pretrained(directory)


def build_model(directory: Path, seed: int) -> int:
    """Random-init a ~7M-parameter Llama with an 8k vocab, save it; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def build_sft_data(path: Path, sampler: TextSampler, seed: int, n_samples: int) -> None:
    """Prompt/completion JSONL: prompts of 4-100 words, completions of 4-170 words, both
    log-uniform, which gives samples of roughly 20-400 tokens."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n_samples):
            prompt_words = _log_uniform(rng, 4, 100)
            completion_words = _log_uniform(rng, 4, 170)
            prompt = f"### Instruction:\n{sampler.sentence_text(rng, prompt_words)}\n### Response:\n"
            completion = sampler.sentence_text(rng, completion_words)
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def build_fixture(directory: Path, seed: int, n_samples: int) -> dict:
    """Model + tokenizer in ``directory/model``, data in ``directory/train.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    sampler = TextSampler(seed)
    build_tokenizer(model_dir, sampler, seed)
    n_params = build_model(model_dir, seed)
    data_path = directory / "train.jsonl"
    build_sft_data(data_path, sampler, seed + 1, n_samples)
    return {"model_dir": str(model_dir), "data_path": str(data_path), "n_params": n_params}
