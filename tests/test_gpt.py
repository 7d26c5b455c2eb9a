"""The GPT backbone: physical-layer placement, shapes, causality, weight tying and sampling."""

import pytest
import torch
from torch import nn

from astraora.errors import ConfigError
from astraora.models.gpt import GPT, MLP

V = 37


def linear_factory(d_in, d_out, name):
    return nn.Linear(d_in, d_out)


def tiny_gpt(factory=linear_factory, **overrides):
    kwargs = dict(vocab_size=V, n_layer=3, n_head=2, n_embd=16, block_size=12, dropout=0.1, physical_blocks=2)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return GPT(factory, **kwargs)


def test_factory_builds_one_layer_per_physical_block_with_stable_names():
    calls = []

    def factory(d_in, d_out, name):
        calls.append((d_in, d_out, name))
        return nn.Linear(d_in, d_out)

    model = tiny_gpt(factory, n_layer=4, physical_blocks=2)
    assert calls == [(16, 16, "blocks.2.mlp"), (16, 16, "blocks.3.mlp")]
    assert isinstance(model.blocks[0].mlp, MLP) and isinstance(model.blocks[1].mlp, MLP)
    # the module path of each physical layer is the name it was built with
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], nn.Linear) for _, _, name in calls)

    calls.clear()
    tiny_gpt(factory, physical_blocks=0)
    assert calls == []


def test_physical_layers_keep_their_own_initialisation():
    def factory(d_in, d_out, name):
        layer = nn.Linear(d_in, d_out)
        nn.init.constant_(layer.weight, 0.5)
        return layer

    model = tiny_gpt(factory)
    assert torch.all(model.blocks[2].mlp.weight == 0.5)


def test_forward_shape_backward_and_weight_tying():
    model = tiny_gpt()
    idx = torch.randint(0, V, (3, 12))
    logits = model(idx)
    assert logits.shape == (3, 12, V)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert model.lm_head.weight is model.tok_emb.weight
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[2].mlp.weight.grad.abs().sum() > 0


def test_attention_is_causal():
    model = tiny_gpt().eval()
    idx = torch.randint(0, V, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_rejects_bad_shapes_and_config():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ConfigError, match="n_head"):
        tiny_gpt(n_head=3)
    with pytest.raises(ConfigError, match="physical_blocks"):
        tiny_gpt(physical_blocks=4)


def test_generate_length_reproducibility_and_mode():
    model = tiny_gpt().train()
    prompt = torch.randint(0, V, (2, 15))  # longer than block_size: the context is cropped

    def sample(seed, **kwargs):
        return model.generate(prompt, 20, temperature=0.8, generator=torch.Generator().manual_seed(seed), **kwargs)

    out = sample(1)
    assert out.shape == (2, 35) and out.dtype == torch.long
    assert torch.equal(out[:, :15], prompt)
    assert torch.equal(out, sample(1))
    assert not torch.equal(out, sample(2))
    assert model.training  # mode restored

    greedy = sample(3, top_k=1)
    assert torch.equal(greedy, sample(4, top_k=1))  # top-1 sampling is deterministic
    with torch.no_grad():
        model.eval()
        assert torch.equal(greedy[:, 15], model(prompt[:, -12:])[:, -1].argmax(-1))
