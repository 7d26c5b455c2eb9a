"""A GPT-style decoder whose last MLPs are physical layers.

Token and position embeddings feed ``n_layer`` pre-LayerNorm blocks of causal self-attention
and an MLP; a final LayerNorm and a language-model head tied to the token embedding give the
logits. As in the paper's language-modelling experiment, the whole MLP of each of the last
``physical_blocks`` blocks is replaced by ONE physical layer mapping ``n_embd → n_embd``, built by
``layer_factory(n_embd, n_embd, f"blocks.{i}.mlp")`` (a ``HybridLayer``, or an ``nn.Linear`` for
``device=digital``).

Shapes: B batch, T sequence length (≤ ``block_size``), C = ``n_embd``, V = ``vocab_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from astraora.errors import ConfigError

LayerFactory = Callable[[int, int, str], nn.Module]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions ≤ t."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) → (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) → (B, n_head, T, C / n_head)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """The digital feed-forward part of a block: C → 4C → GELU → C."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) → (B, T, C)."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)), dropout on both branches."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp: nn.Module = MLP(n_embd)  # GPT swaps this for a physical layer in the last blocks
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) → (B, T, C)."""
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """GPT decoder with the MLPs of the last ``physical_blocks`` blocks on physical hardware.

    Args:
        layer_factory: ``(d_in, d_out, name) → module`` mapping ``(..., d_in) → (..., d_out)``.
        vocab_size: number of token ids V (from the datamodule).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: model width C.
        block_size: the longest context the model accepts (size of the position table).
        dropout: dropout probability on embeddings, attention weights and residual branches.
        physical_blocks: l, how many of the last blocks have their MLP replaced by a physical layer.
    """

    def __init__(
        self,
        layer_factory: LayerFactory,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_size: int = 64,
        dropout: float = 0.0,
        physical_blocks: int = 1,
    ):
        super().__init__()
        if n_embd % n_head != 0:
            raise ConfigError(f"task.model.n_embd={n_embd} must be divisible by task.model.n_head={n_head}.")
        if not 0 <= physical_blocks <= n_layer:
            raise ConfigError(f"task.model.physical_blocks={physical_blocks} must be between 0 and n_layer={n_layer}.")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self._init_digital_weights(n_layer)

        # The paper's placement: the whole MLP of each of the last l blocks becomes one physical layer.
        for i in range(n_layer - physical_blocks, n_layer):
            self.blocks[i].mlp = layer_factory(n_embd, n_embd, f"blocks.{i}.mlp")

    def _init_digital_weights(self, n_layer: int) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual output projections
        scaled by 1/√(2·n_layer) so the residual stream's variance does not grow with depth.
        Runs before the physical layers exist, so their own initialisation is left alone."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) int64 → next-token logits (B, T, V)."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.block_size}.")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend a prompt by sampling one token at a time.

        Args:
            idx: prompt token ids (B, T0) int64, T0 ≥ 1.
            max_new_tokens: how many tokens to append.
            temperature: > 0; logits are divided by it (below 1 is more conservative).
            top_k: if given, sample only among the k most likely tokens.
            generator: source of the sampling randomness (on idx's device), for reproducible samples.

        Returns:
            (B, T0 + max_new_tokens) int64: the prompt followed by the sampled tokens. The model is
            in eval mode (no dropout) while sampling and is returned to its previous mode afterwards.
        """
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.block_size :])[:, -1, :] / temperature  # (B, V)
                if top_k is not None:
                    kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                next_idx = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
                idx = torch.cat([idx, next_idx], dim=1)
        finally:
            self.train(was_training)
        return idx
