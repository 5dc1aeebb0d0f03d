"""The preference losses against TRL's DPOTrainer on one batch of a real tiny Llama, and the
packed concatenated batch against the unpacked one."""

from __future__ import annotations

import math

import pytest
import torch

from automodel_cli.components.loss.preference import preference_losses, sequence_logps
from automodel_cli.training.preference_data import PairCollator, PairEncoder, model_inputs
from model_dirs import save_model
from tolerances import assert_close_f32

ROWS = [{"prompt": "reverse: abc\n", "chosen": "cba", "rejected": "cab"},
        {"prompt": "reverse: abcdef\n", "chosen": "fedcba", "rejected": "fedcab"},
        {"prompt": "reverse: ij\n", "chosen": "ji", "rejected": "jjii"}]
COLUMNS = ("prompt", "chosen", "rejected")
#: One scalar of the comparison sums every token's log-probability over a log-softmax of the
#: demo vocabulary (64) after a 2-layer decoder of width 128 / 352.
TERMS = 128 + 352 + 64 + 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("tiny"))


def perturbed_policy(model_dir):
    """The saved model with every weight moved a little: the policy differs from the reference."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy


def our_pairs(tokenizer):
    encoder = PairEncoder(tokenizer, None)
    return [encoder.encode(row["prompt"], row["chosen"], row["rejected"], i, COLUMNS) for i, row in enumerate(ROWS)]


def our_terms(policy, reference, pairs, loss: str, *, packed_length: int | None = None, beta: float = 0.1):
    collate = PairCollator(0, packed_length=packed_length)
    batch = collate(pairs)
    inputs = model_inputs(batch, "cpu")
    k = batch["pairs"]

    def logps(model):
        logits = model(**inputs, use_cache=False).logits
        return sequence_logps(logits, batch["labels"], batch["sequence_index"], 2 * k)

    with torch.no_grad():
        policy_logps, tokens = logps(policy)
        reference_logps, _ = logps(reference)
    terms = preference_losses(loss, chosen_logps=policy_logps[:k], rejected_logps=policy_logps[k:],
                              chosen_tokens=tokens[:k], rejected_tokens=tokens[k:],
                              ref_chosen_logps=reference_logps[:k], ref_rejected_logps=reference_logps[k:], beta=beta)
    return terms, policy_logps, batch


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trl_dpo_trainer(model_dir, tmp_path, loss):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, loss_type=[loss], use_cpu=True,
                     max_length=None, bf16=False, per_device_train_batch_size=len(ROWS))
    trainer = DPOTrainer(model=perturbed_policy(model_dir), ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    trl_rows = [trainer.train_dataset[i] for i in range(len(ROWS))]
    pairs = our_pairs(tokenizer)
    for ours, theirs in zip(pairs, trl_rows):  # the same tokens, the same scored response
        prompt = theirs["prompt_ids"]
        assert ours["chosen"] == (prompt + theirs["chosen_ids"], [-100] * len(prompt) + theirs["chosen_ids"])
        assert ours["rejected"] == (prompt + theirs["rejected_ids"], [-100] * len(prompt) + theirs["rejected_ids"])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows))
    trl = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    terms, logps, _ = our_terms(perturbed_policy(model_dir), reference, pairs, loss)
    got = {"loss": terms.losses.mean(), "rewards/chosen": terms.chosen_rewards.mean(),
           "rewards/rejected": terms.rejected_rewards.mean(),
           "rewards/margins": (terms.chosen_rewards - terms.rejected_rewards).mean(),
           "logps/chosen": logps[:3].mean()}
    expected = {"loss": trl_loss, **{name: torch.tensor(trl[name]) for name in list(got)[1:]}}
    assert abs(float(got["rewards/margins"])) > 1e-3  # the policy differs from the reference
    for name, value in got.items():
        assert abs(float(value) - float(expected[name])) <= 1e-5, (name, float(value), float(expected[name]))
        assert_close_f32(value.float(), torch.as_tensor(expected[name]).float(), terms=TERMS, depth=8,
                         scale=max(1.0, abs(float(expected[name]))), msg=name)


def test_policy_equal_to_reference_gives_log_2(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    terms, _, _ = our_terms(model, model, our_pairs(AutoTokenizer.from_pretrained(model_dir)), "sigmoid")
    assert torch.allclose(terms.losses, torch.full((len(ROWS),), math.log(2)), rtol=0, atol=1e-7)
    assert terms.chosen_rewards.abs().max() == 0 and terms.rejected_rewards.abs().max() == 0


def test_packed_batch_gives_the_unpacked_log_probs(model_dir):
    """Six sequences packed into rows of 48 tokens: each attends only to itself (position ids
    restart), so every sequence's log-probability equals the padded batch's."""
    from transformers import AutoTokenizer

    pairs = our_pairs(AutoTokenizer.from_pretrained(model_dir))
    policy = perturbed_policy(model_dir)
    unpacked, unpacked_logps, _ = our_terms(policy, policy, pairs, "sigmoid")
    packed, packed_logps, batch = our_terms(policy, policy, pairs, "sigmoid", packed_length=48)
    assert batch["input_ids"].shape[0] < 2 * len(ROWS)  # several sequences do share a row
    assert_close_f32(packed_logps, unpacked_logps, terms=TERMS, depth=8)
    assert (unpacked_logps[:3] - unpacked_logps[3:]).abs().min() > 1e-3  # chosen and rejected differ


def test_reference_free_losses_match_their_formulas():
    """simpo and orpo on hand-made log-probabilities (TRL's CPOTrainer and ORPOTrainer formulas)."""
    chosen, rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -3.0])
    chosen_tokens, rejected_tokens = torch.tensor([2, 3]), torch.tensor([3, 1])
    simpo = preference_losses("simpo", chosen_logps=chosen, rejected_logps=rejected, chosen_tokens=chosen_tokens,
                              rejected_tokens=rejected_tokens, beta=2.0, simpo_gamma=0.5)
    margin = 2.0 * (chosen / chosen_tokens - rejected / rejected_tokens) - 0.5
    assert torch.allclose(simpo.losses, -torch.nn.functional.logsigmoid(margin))
    orpo = preference_losses("orpo", chosen_logps=chosen, rejected_logps=rejected, chosen_tokens=chosen_tokens,
                             rejected_tokens=rejected_tokens, orpo_alpha=0.25)
    a_w, a_l = chosen / chosen_tokens, rejected / rejected_tokens
    log_odds = (a_w - torch.log(1 - a_w.exp())) - (a_l - torch.log(1 - a_l.exp()))
    assert torch.allclose(orpo.losses, -0.25 * torch.nn.functional.logsigmoid(log_odds))
    assert torch.allclose(orpo.chosen_rewards, 0.25 * a_w)


@pytest.mark.parametrize("packed_length", [None, 48], ids=["padded", "packed"])
def test_head_on_scored_rows_gives_the_full_logits_values(model_dir, packed_length):
    """The recipe applies the LM head to the response positions only; the same sums and counts
    as the full logits."""
    from transformers import AutoTokenizer

    from automodel_cli.training.reference import response_logps

    policy = perturbed_policy(model_dir)
    batch = PairCollator(0, packed_length=packed_length)(our_pairs(AutoTokenizer.from_pretrained(model_dir)))
    inputs = model_inputs(batch, "cpu")
    with torch.no_grad():
        rows, rows_tokens = response_logps(policy, inputs, batch["labels"], batch["sequence_index"], 6)
        full, full_tokens = sequence_logps(policy(**inputs, use_cache=False).logits, batch["labels"],
                                           batch["sequence_index"], 6)
    assert torch.equal(rows_tokens, full_tokens) and rows_tokens.min() > 0
    assert_close_f32(rows, full, terms=TERMS, depth=8)
