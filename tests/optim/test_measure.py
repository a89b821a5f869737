"""`measure_training_memory` against bytes worked out by hand from a tied small Llama's shapes, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext.optim import create_projected_optimizer, measure_training_memory

from ._measure import SMALL_LLAMA

V, H, FF = SMALL_LLAMA["vocab_size"], SMALL_LLAMA["hidden_size"], SMALL_LLAMA["intermediate_size"]
KV = H // SMALL_LLAMA["num_attention_heads"] * SMALL_LLAMA["num_key_value_heads"]
LAYER = 2 * H * H + 2 * KV * H + 3 * H * FF + 2 * H  # q, o; k, v; gate, up, down; two norms
PARAMS = V * H + SMALL_LLAMA["num_hidden_layers"] * LAYER + H  # tied embedding counted once, final norm


def _tied() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def test_adamw_holds_every_gradient_and_two_moments_per_weight() -> None:
    model, batch = _tied()
    measured = measure_training_memory(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), batch)
    n_tensors = 1 + SMALL_LLAMA["num_hidden_layers"] * 9 + 1
    assert measured.weights == 4 * PARAMS and measured.gradients == 4 * PARAMS
    assert measured.optimizer_state == 2 * 4 * PARAMS + 4 * n_tensors  # exp_avg, exp_avg_sq, float32 step


def test_freeing_counts_the_tied_weights_partial_gradient_through_backward() -> None:
    # The tied embedding's first part (from lm_head) waits in the autograd engine until the embedding's part
    # arrives at the end of backward, while each other gradient is stepped and freed in turn: the peak is the
    # tied weight plus the largest other gradient (an MLP matrix), never all of them.
    model, batch = _tied()
    measured = measure_training_memory(
        model, lambda m: create_projected_optimizer(m, rank=8, lr=1e-3, step_in_backward=True), batch
    )
    assert measured.gradients == 4 * V * H + 4 * FF * H


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "gpt2"}, "`model`"),
        ({"make_optimizer": torch.optim.AdamW([torch.zeros(1, requires_grad=True)])}, "`make_optimizer`"),
        ({"batch": [1, 2]}, "`batch`"),
        ({"steps": 0}, "`steps`"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, match: str) -> None:
    model, batch = _tied()
    arguments = {"model": model, "make_optimizer": lambda m: torch.optim.AdamW(m.parameters()), "batch": batch}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        measure_training_memory(**arguments)
