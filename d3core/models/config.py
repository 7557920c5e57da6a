"""Architecture-neutral model configuration shared by every d3core dLLM.

Each architecture module translates its official ``config.json`` (LLaDA's OLMo-style
names, Dream's Qwen2-style names) to and from this one dataclass, so the layers, the
cache and the samplers never see checkpoint-specific field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape and special token ids of a bidirectional transformer dLLM.

    ``shift_logits`` is True for Dream-style models, whose prediction for position ``i``
    is read from the output at position ``i - 1`` (they were initialised from an AR model).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    mask_id: int
    eos_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None = None
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    shift_logits: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_seq_len": self.max_seq_len,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}: pick a head count that divides the width"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}: grouped-query attention needs whole groups"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"ModelConfig head_dim={self.hidden_size // self.num_heads} is odd: "
                "rotary embeddings need an even head dimension"
            )
        special = {"mask_id": self.mask_id, "pad_id": self.pad_id}
        special.update({f"eos_ids[{i}]": e for i, e in enumerate(self.eos_ids)})
        if self.bos_id is not None:
            special["bos_id"] = self.bos_id
        for name, value in special.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.{name}={value} lies outside the vocabulary [0, {self.vocab_size}): "
                    "read special ids from the checkpoint's config and tokenizer"
                )
        if not self.eos_ids:
            raise ValueError("ModelConfig.eos_ids is empty: a dLLM needs at least one EOS id")
        if self.mask_id in self.eos_ids:
            raise ValueError(f"ModelConfig.mask_id={self.mask_id} is also an EOS id: they must differ")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count implied by the shape (untied embedding and head)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2 + (d + 2 * kv if self.qkv_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        return self.num_layers * per_layer + 2 * v * d + d
