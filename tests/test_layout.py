import pytest

from kvmesh.keys import model_namespace
from kvmesh.layout import KVLayout


def test_bytes_per_token_of_known_models() -> None:
    assert KVLayout(30, 3, 64, "bfloat16").bytes_per_token == 23_040
    assert KVLayout(32, 8, 128, "bfloat16").bytes_per_token == 131_072


def test_bad_layouts_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(2, 1, 4, "uint4")
    with pytest.raises(ValueError, match="page_view"):
        KVLayout(2, 1, 4, "bfloat16", page_view="sideways")
    with pytest.raises(ValueError, match="block_size"):
        KVLayout(2, 1, 4, "bfloat16", block_size=0)


def test_page_and_chunk_sizes() -> None:
    layout = KVLayout(2, 3, 8, "bfloat16", block_size=16)
    assert layout.page_elements == 3 * 16 * 2 * 8  # vLLM-CPU's page: [kv_heads, block_size, 2 * head_size]
    assert layout.chunk_shape(5) == (2, 2, 5, 3, 8)
    assert layout.chunk_bytes(5) == 5 * layout.bytes_per_token


def test_fingerprint_is_the_namespace_string_engines_have_always_used() -> None:
    # the connector's namespace before page formats had one description: stored entries keep their keys
    layout = KVLayout(30, 3, 64, "bfloat16", block_size=16, page_view="vllm-cpu-vec")
    assert layout.fingerprint() == "L30.H3.D64.bfloat16.pages16.vllm-cpu-vec"
    assert layout.namespace("fp:abc", "tenant") == model_namespace(
        "fp:abc", "L30.H3.D64.bfloat16.pages16.vllm-cpu-vec", "tenant")


def test_every_field_of_the_format_changes_the_namespace() -> None:
    base = KVLayout(30, 3, 64, "bfloat16", block_size=16, page_view="vllm-cpu-vec")
    others = [KVLayout(31, 3, 64, "bfloat16", 16, "vllm-cpu-vec"), KVLayout(30, 4, 64, "bfloat16", 16, "vllm-cpu-vec"),
              KVLayout(30, 3, 32, "bfloat16", 16, "vllm-cpu-vec"), KVLayout(30, 3, 64, "float16", 16, "vllm-cpu-vec"),
              KVLayout(30, 3, 64, "bfloat16", 32, "vllm-cpu-vec"), KVLayout(30, 3, 64, "bfloat16", 16, "vllm-cpu-amx")]
    names = {layout.namespace("m") for layout in [base, *others]}
    assert len(names) == 1 + len(others)


def test_the_engines_kernel_is_part_of_the_namespace_even_where_the_view_is_the_same() -> None:
    opaque = [KVLayout(30, 3, 64, "bfloat16", 128, "opaque", page_kernel=name)
              for name in ("", "vllm-cpu.vec16", "vllm-cpu.neon")]
    assert len({layout.namespace("m") for layout in opaque}) == 3
    assert opaque[1].fingerprint() == "L30.H3.D64.bfloat16.pages128.opaque.kernel=vllm-cpu.vec16"
    with pytest.raises(ValueError, match="page_kernel"):
        KVLayout(30, 3, 64, "bfloat16", page_kernel="two words")


def test_a_latent_layout_holds_one_value_per_head_and_token_and_never_shares_with_keys_and_values() -> None:
    mla = KVLayout(num_layers=4, num_kv_heads=1, head_size=576, block_size=16, kv_parts=1)
    plain = KVLayout(num_layers=4, num_kv_heads=1, head_size=576, block_size=16)
    assert mla.page_elements == 16 * 576 and plain.page_elements == 2 * 16 * 576
    assert mla.bytes_per_token == 4 * 576 * 2
    assert mla.fingerprint() != plain.fingerprint() and ".latent" in mla.fingerprint()
    with pytest.raises(ValueError, match="kv_parts must be 2 .keys and values. or 1 .a latent., got 3"):
        KVLayout(num_layers=4, num_kv_heads=1, head_size=64, kv_parts=3)


def test_each_kv_group_keeps_what_a_later_hit_needs_of_a_chunk() -> None:
    from kvmesh.layout import KVGroup

    pages = KVLayout(2, 1, 4, "bfloat16", block_size=16)
    assert KVGroup("full", pages).kept_tokens(256, 512) == (256, 512)
    assert KVGroup("window", pages, window=100).kept_tokens(256, 512) == (412, 512)
    assert KVGroup("window", pages, window=1000).kept_tokens(256, 300) == (256, 300)
    state = KVGroup.state(3, 19840, 128, "MAMBA2:3x288float32")
    assert state.kept_tokens(256, 512) == (512, 512) and state.page_elements == 19840
    fingerprints = {KVGroup("full", pages).fingerprint(), KVGroup("window", pages, window=100).fingerprint(),
                    KVGroup("window", pages, window=64).fingerprint(), state.fingerprint()}
    assert len(fingerprints) == 4


def test_bad_kv_groups_are_refused_naming_the_field() -> None:
    from kvmesh.layout import KVGroup

    pages = KVLayout(2, 1, 4, "bfloat16")
    with pytest.raises(ValueError, match="kind must be one of full, window, state, got 'ring'"):
        KVGroup("ring", pages)
    with pytest.raises(ValueError, match="a 'window' KV group has window=0"):
        KVGroup("window", pages)
    with pytest.raises(ValueError, match="a 'full' KV group has window=64"):
        KVGroup("full", pages, window=64)
    with pytest.raises(ValueError, match="'state' KV group pages int8 bytes"):
        KVGroup("state", pages)
