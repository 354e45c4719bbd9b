import pytest
import torch

from kvmesh.entry import DTYPES, EntryMeta, EntryMetaError, dtype_name


def test_descriptions_round_trip_through_their_text_form() -> None:
    for meta in (EntryMeta("bfloat16", (4, 2, 64, 2, 32)), EntryMeta("float16", (30, 2, 3, 16, 128), "vllm-cpu-amx"),
                 EntryMeta("float32", (1,), "opaque")):
        assert EntryMeta.decode(meta.encode()) == meta


def test_the_text_form_is_the_one_l1_and_the_wire_have_always_carried() -> None:
    assert EntryMeta("bfloat16", (4, 2, 64, 2, 32)).encode() == "bfloat16:4,2,64,2,32"  # chunk: no view
    assert EntryMeta("bfloat16", (2, 1, 3, 16, 16), "cpu-pages").encode() == "bfloat16:2,1,3,16,16:cpu-pages"
    assert EntryMeta.decode("bfloat16:4,2,64,2,32").view == "chunk"


def test_sizes_and_dtypes() -> None:
    meta = EntryMeta.of(torch.zeros(3, 5, dtype=torch.float16), "opaque")
    assert meta == EntryMeta("float16", (3, 5), "opaque")
    assert meta.nbytes == 30 and meta.torch_dtype is torch.float16
    assert dtype_name(torch.bfloat16) == "bfloat16" and DTYPES["float32"] is torch.float32


@pytest.mark.parametrize("text", ["", "bfloat16", "bfloat16:", "uint4:4,4", "bfloat16:4,x", "bfloat16:4,4:sideways",
                                  "bfloat16:4,-1"])
def test_what_is_not_a_description_is_refused_quoting_it(text: str) -> None:
    with pytest.raises(EntryMetaError, match="entry description|shape|dtype"):
        EntryMeta.decode(text)


def test_bad_fields_are_refused_naming_them() -> None:
    with pytest.raises(EntryMetaError, match="unsupported dtype 'uint4'"):
        EntryMeta("uint4", (1,))
    with pytest.raises(EntryMetaError, match="unknown KV view 'sideways'"):
        EntryMeta("bfloat16", (1,), "sideways")
    with pytest.raises(EntryMetaError, match="tuple of sizes"):
        EntryMeta("bfloat16", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(EntryMetaError, match="unsupported dtype torch.int16"):
        dtype_name(torch.int16)
