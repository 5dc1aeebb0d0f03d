"""Tiny real models, optimizers and training loops for the checkpoint tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = 64


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                  attention_dropout=0.2, tie_word_embeddings=False)
    values.update(overrides)
    config = LlamaConfig(**values)
    config._attn_implementation = "eager"  # dropout through torch's global RNG, deterministic on CPU
    return config


@dataclass
class Run:
    """Everything a resume must reproduce: model, optimizer, schedule and data order."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_generator: torch.Generator
    losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator}


# A fixed corpus; the *order* in which it is sampled comes from the run's data generator.
DATA = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def make_run(model: torch.nn.Module, lr: float = 1e-2) -> Run:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    return Run(model, optimizer, scheduler, torch.Generator().manual_seed(1234))


def train(run: Run, steps: int, batch_size: int = 4) -> list[torch.Tensor]:
    """A real loop: shuffled batches, forward with dropout, backward, clip, step, schedule."""
    run.model.train()
    new = []
    for _ in range(steps):
        index = torch.randperm(len(DATA), generator=run.data_generator)[:batch_size]
        batch = DATA[index]
        loss = run.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], 1.0)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        new.append(loss.detach().clone())
    run.losses += new
    return new


def llama(seed: int, **overrides) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


class TinyLM(torch.nn.Module):
    """A few-parameter language model for tests that exercise files, not numerics."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(hidden, VOCAB)

    def forward(self, input_ids, labels):
        logits = self.head(self.drop(self.embed(input_ids)))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return type("Out", (), {"loss": loss})()


def tiny(seed: int = 0, hidden: int = 8) -> Run:
    torch.manual_seed(seed)
    return make_run(TinyLM(hidden))
