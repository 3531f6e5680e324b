"""`prw.gate_words`: prompt gates that also read the prompt word by word, so a gate can tell the object an
instruction names from the others ("make the red square blue" holds both colours, which the pooled prompt mixes)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cologen.model.experts import ExpertBank, GateContext, place_features
from tests.test_prompt_gates import fit_gate, grid_ids, prompt_gate_module

COLOURS, WORD_DIM = 4, 8  # a word: its colour (one-hot over 4) and its role (4: the named object, 5: the new colour)


def bank(word_dim: int, dim: int = 16) -> ExpertBank:
    return ExpertBank(dim, num_experts=2, rank=2, alpha=2, token_gate=True, hard_gate=True, prompt_dim=WORD_DIM,
                      gate_rank=4, word_dim=word_dim)


def word(colour: int, role: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(colour), WORD_DIM).float() + F.one_hot(torch.tensor(COLOURS + role), WORD_DIM)


def recolour_task():
    """A scene of 16 tokens, four of each colour, and every instruction 'make the <a> object <b>' (a != b): the
    tokens that change are those of colour a. 'a -> b' and 'b -> a' have the same pooled prompt (the mean of their
    words), so only a gate that reads the words can tell which of the two colours changes."""
    colours = torch.arange(16) % COLOURS
    scene = F.one_hot(colours, COLOURS).float().repeat(1, 4)  # (16, 16): each token shows its colour
    pairs = list(itertools.permutations(range(COLOURS), 2))
    words = torch.stack([torch.stack([word(a, 0), word(b, 1)]) for a, b in pairs])  # (12, 2, 8)
    changed = torch.stack([colours == a for a, _ in pairs])  # (12, 16)
    context = GateContext(words.mean(1), place_features(grid_ids(4, 4)), words)
    return scene.expand(len(pairs), -1, -1), context, changed


def test_a_word_gate_starts_as_the_prompt_gate_without_words():
    torch.manual_seed(0)
    with_words, without = bank(WORD_DIM), bank(0)
    with torch.no_grad():
        for e in with_words.experts:  # every term but the words' values is non-zero
            for m in (e.token_gate, e.prompt_gate.token_prompt, e.prompt_gate.place_prompt, e.prompt_gate.prompt_bias):
                m.weight.normal_()
    without.load_state_dict(with_words.state_dict(), strict=False)
    hidden, index = torch.randn(3, 16, 16), torch.tensor([0, 1, 1])
    words = torch.randn(3, 5, WORD_DIM)
    context = GateContext(words.mean(1), place_features(grid_ids(4, 4)), words)
    torch.testing.assert_close(with_words.gate_logits(hidden, index, context), without.gate_logits(hidden, index, context))


def test_padding_words_change_nothing_and_missing_words_are_an_error():
    torch.manual_seed(0)
    b = bank(WORD_DIM)
    with torch.no_grad():
        for e in b.experts:
            e.prompt_gate.word_value.weight.normal_()
    hidden, index = torch.randn(2, 16, 16), torch.tensor([0, 1])
    words = torch.randn(2, 3, WORD_DIM)
    padded = torch.cat([words, torch.zeros(2, 4, WORD_DIM)], 1)  # the text encoder pads with all-zero rows
    place = place_features(grid_ids(4, 4))
    logits = b.gate_logits(hidden, index, GateContext(words.mean(1), place, words))
    torch.testing.assert_close(b.gate_logits(hidden, index, GateContext(words.mean(1), place, padded)), logits)
    assert not torch.allclose(logits, b.gate_logits(hidden, index, GateContext(words.mean(1), place, words.flip(1) * 2)))
    with pytest.raises(ValueError, match="gate_words"):
        b.gate_logits(hidden, index, GateContext(words.mean(1), place))


def test_a_word_gate_tells_the_named_object_from_the_new_colour_where_the_pooled_prompt_cannot():
    torch.manual_seed(0)
    hidden, context, changed = recolour_task()
    with_words = fit_gate(bank(WORD_DIM), hidden, context, changed, steps=1000)
    torch.manual_seed(0)
    pooled_only = fit_gate(bank(0), hidden, context, changed, steps=1000)
    assert with_words == 1.0
    # the two colours of an instruction are 8 of the 16 tokens, and its mirror asks for the other 4 of them: a gate
    # reading the pooled prompt alone is wrong on at least 4 of those 8 in one of the two
    assert pooled_only <= 0.75 + 1e-6


def test_config_needs_prompt_gates():
    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="gate_words"):
        PRWConfig(token_gate=True, gate_words=True)


def test_each_samples_words_reach_its_own_gates_in_the_model():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module(gate_words=True)
    data = batch()
    data["prompt"] = ["make the red square blue", "make the blue square red", "remove the circle"]
    inputs = module.prepare(data, False, torch.Generator().manual_seed(0))
    text = inputs["text"]
    args = (inputs["source_tokens"], inputs["source_ids"], text.pooled, inputs["timestep"])
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "experts.0.prompt_gate.word_value" in name:
                p.normal_()
        gates = module.model.encode_source(*args, words=text.tokens).gates
        other = text.tokens.clone()
        other[1] = other[0]  # sample 1 reads sample 0's words, with its own pooled prompt
        moved = module.model.encode_source(*args, words=other).gates
        with pytest.raises(ValueError, match="gate_words"):
            module.model.encode_source(*args)
    for block in gates:
        torch.testing.assert_close(moved[block][[0, 2]], gates[block][[0, 2]])
        assert not torch.allclose(moved[block][1], gates[block][1])
    # the model's forward hands its prompt's words to the source pass (it raises without them)
    with torch.no_grad():
        out = module.model(inputs["latents"], inputs["timestep"], text, inputs["img_ids"], inputs["txt_ids"],
                           inputs["source_tokens"], inputs["source_ids"])
    for block in gates:
        torch.testing.assert_close(out.token_gates[block], gates[block])


def test_the_sampler_hands_the_words_to_its_cached_source_pass_and_keys_a_kept_cache_by_them():
    from cologen.model.cologen_transformer import ConditionCache
    from cologen.model.text_encoders import TextEmbeddings
    from tests.test_sampling import sources

    module = prompt_gate_module(gate_words=True)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "prompt_gate.word_value" in name or "prompt_gate.prompt_bias" in name:
                p.normal_()
    prompts, src = ["make the red square blue", "remove the green circle"], sources()
    on, _ = module.generate(prompts, src, ["editing", "editing"], seed=[1, 2], steps=4, use_cache=True)
    off, _ = module.generate(prompts, src, ["editing", "editing"], seed=[1, 2], steps=4, use_cache=False)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    # a kept cache: the same pooled prompt with other words is another condition
    sampler, text = module.sampler(steps=2), module.encode_text({"prompt": prompts[:1]})
    kept = ConditionCache()
    sampler.sample(text, 32, 32, src[:1], ["editing"], cache=kept)
    first = kept.keys[0]
    other = TextEmbeddings(text.tokens.flip(1), text.pooled)
    sampler.sample(other, 32, 32, src[:1], ["editing"], cache=kept)
    assert kept.keys[0] != first
    assert {key[0] for key in kept.entries} == {first, kept.keys[0]}  # each request's streams under its own key
