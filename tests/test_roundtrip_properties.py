"""Property tests: any tensors, any dtype and shape, survive every conversion route bit for bit."""

from __future__ import annotations

from collections import OrderedDict

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import shardwise

from conftest import assert_same_tensors

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.uint16, torch.uint32, torch.uint64,
]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]

shapes = st.one_of(
    st.just(()),  # 0-d
    st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple),  # small, empty included
    st.sampled_from([(0,), (3, 0, 2), (1, 70_000)]),  # empty and large
)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    n = 1
    for d in shape:
        n *= d
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize)) if n < 4096 else None
    if raw is None:  # large: seeded random bytes instead of drawing them
        seed = draw(st.integers(0, 2**31))
        raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        raw = bytes(raw.numpy().tobytes())
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)  # only 0 and 1 are valid bools
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


state_dicts = st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="\"\\"), min_size=1, max_size=12),
    tensors(),
    min_size=1,
    max_size=6,
).filter(lambda d: "__metadata__" not in d).map(OrderedDict)  # reserved by safetensors (tested separately)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts)
def test_torch_to_safetensors_to_torch_to_hf_is_bit_exact(tmp_path_factory, sd):
    tmp = tmp_path_factory.mktemp("prop")
    torch.save(sd, tmp / "src.pt")
    shardwise.convert(tmp / "src.pt", tmp / "a.safetensors")
    shardwise.convert(tmp / "a.safetensors", tmp / "b.pt")
    shardwise.convert(tmp / "b.pt", tmp / "hf", to="hf", max_shard_size=50_000)
    assert_same_tensors(sd, torch.load(tmp / "b.pt", weights_only=True))
    with shardwise.open(tmp / "hf") as ckpt:
        assert_same_tensors(sd, {name: ckpt.tensors.read(name) for name in ckpt.tensors.keys()})
    report = shardwise.diff(tmp / "src.pt", tmp / "hf")
    assert report.equal, report


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts, target=st.sampled_from(["bf16", "fp16", "fp32"]))
def test_dtype_cast_matches_torch_to(tmp_path_factory, sd, target):
    tmp = tmp_path_factory.mktemp("cast")
    torch.save(sd, tmp / "src.pt")
    shardwise.convert(tmp / "src.pt", tmp / "out.pt", dtype=target)
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[target]
    castable = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    expected = {k: v.to(wanted) if v.dtype in castable else v for k, v in sd.items()}
    assert_same_tensors(expected, torch.load(tmp / "out.pt", weights_only=True))
