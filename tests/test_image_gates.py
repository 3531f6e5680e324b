"""`prw.gate_image`: prompt gates that also read a small CNN over the condition's token grid, so a gate can tell an
object's size and shape, which a single token does not show ("make the large square red")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cologen.model.experts import ConditionImageEncoder, ExpertBank, GateContext, place_features
from tests.test_prompt_gates import fit_gate, grid_ids, prompt_gate_module

CHANNELS = 4


def bank(image_channels: int, dim: int = 16) -> ExpertBank:
    return ExpertBank(dim, num_experts=2, rank=2, alpha=2, token_gate=True, hard_gate=True, prompt_dim=2,
                      gate_rank=4, image_channels=image_channels)


def sizes_task():
    """Scenes of 8 x 8 tokens with one large object (3 x 3 tokens) and one small one (1 token) that look alike token
    by token; 'change the large one' / 'change the small one': the gate must find the object of the named size."""
    g = torch.Generator().manual_seed(0)
    images, changed, prompts = [], [], []
    for i in range(32):  # both anywhere, apart: a token's place does not tell either
        grid = torch.zeros(8, 8, dtype=torch.bool)
        large, small = torch.zeros_like(grid), torch.zeros_like(grid)
        y, x = torch.randint(0, 6, (2,), generator=g).tolist()
        large[y:y + 3, x:x + 3] = True
        apart = F.max_pool2d(large[None, None].float(), 5, 1, 2)[0, 0] == 0
        free = apart.nonzero()
        sy, sx = free[torch.randint(0, len(free), (1,), generator=g)].tolist()[0]
        small[sy, sx] = True
        image = torch.zeros(64, CHANNELS)
        image[(large | small).reshape(-1), 0] = 1.0  # every object token is the same colour
        images.append(image)
        names_large = i % 2 == 0
        changed.append((large if names_large else small).reshape(-1))
        prompts.append(F.one_hot(torch.tensor(0 if names_large else 1), 2).float())
    images = torch.stack(images)
    hidden = F.pad(images, (0, 16 - CHANNELS))  # the token states show the token alone
    return hidden, GateContext(torch.stack(prompts), place_features(grid_ids(8, 8)), image=images), torch.stack(changed)


def test_an_image_gate_starts_as_the_prompt_gate_without_it():
    torch.manual_seed(0)
    with_image, without = bank(CHANNELS), bank(0)
    with torch.no_grad():
        for e in with_image.experts:
            for m in (e.token_gate, e.prompt_gate.token_prompt, e.prompt_gate.place_prompt, e.prompt_gate.prompt_bias):
                m.weight.normal_()
    without.load_state_dict(with_image.state_dict(), strict=False)
    hidden, context, _ = sizes_task()
    index = torch.arange(32) % 2
    torch.testing.assert_close(with_image.gate_logits(hidden, index, context), without.gate_logits(hidden, index, context))


def test_an_image_gate_finds_the_object_of_the_named_size_where_a_token_alone_cannot_tell():
    hidden, context, changed = sizes_task()
    torch.manual_seed(0)
    with_image = fit_gate(bank(CHANNELS), hidden, context, changed, steps=300)
    torch.manual_seed(0)
    without = fit_gate(bank(0), hidden, context, changed, steps=300)
    assert with_image == 1.0
    # a token and its place alone cannot tell the small object from a part of the large one: the best such gate
    # opens every object token for 'large' and none for 'small', wrong on the small object's token in every scene
    assert without <= 1 - changed.shape[0] / changed.numel() + 1e-6


def test_the_encoder_reads_a_square_grid_and_names_what_else_it_got():
    encoder = ConditionImageEncoder(CHANNELS, 8)
    assert encoder(torch.randn(2, 16, CHANNELS)).shape == (2, 16, 8)
    with pytest.raises(ValueError, match="square condition"):
        encoder(torch.randn(2, 12, CHANNELS))
    b, (hidden, context, _) = bank(CHANNELS), sizes_task()
    context.image = None
    with torch.no_grad():
        b.experts[0].prompt_gate.image_prompt.weight.normal_()
    with pytest.raises(ValueError, match="gate_image"):
        b.gate_logits(hidden, torch.zeros(32, dtype=torch.long), context)


def test_config_needs_prompt_gates():
    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="gate_image"):
        PRWConfig(token_gate=True, gate_image=True)


def test_the_model_hands_its_condition_tokens_to_the_gates():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module(gate_image=True)
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    args = (inputs["source_tokens"], inputs["source_ids"], inputs["text"].pooled, inputs["timestep"])
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "experts.0.prompt_gate.image_prompt" in name:
                p.normal_()
        gates = module.model.encode_source(*args).gates
        changed = inputs["source_tokens"].clone()
        changed[1, :8] += 1.0  # sample 1's condition differs on its first row of tokens
        moved = module.model.encode_source(changed, *args[1:]).gates
    for block in gates:
        torch.testing.assert_close(moved[block][[0, 2]], gates[block][[0, 2]])
        # the encoder sees 7 x 7 tokens: a change in the first row reaches the gates of the next three rows too
        assert not torch.allclose(moved[block][1, 8:32], gates[block][1, 8:32])
