"""diff semantics: bit-exact by default, tolerances on request, NaN and inf handled, chunked."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import shardwise
from shardwise.verify import tensor_diff as diff_module


def pair(tmp_path, a: dict, b: dict):
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def test_identical_tensors_in_different_formats_are_equal(tmp_path):
    w = torch.randn(10)
    save_file({"w": w}, tmp_path / "a.safetensors")
    torch.save({"w": w}, tmp_path / "b.pt")
    report = shardwise.diff(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert report.equal and report.compared == 1 and report.compared_bytes == 40


def test_negative_zero_differs_bitwise_but_not_within_tolerance(tmp_path):
    a, b = pair(tmp_path, {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([-0.0, 1.0])})
    exact = shardwise.diff(a, b)
    assert not exact.equal and exact.mismatches[0].mismatched_elements == 1 and exact.mismatches[0].max_abs_diff == 0.0
    assert shardwise.diff(a, b, atol=0.0).equal


def test_nan_equals_nan_and_inf_equals_inf_within_tolerance(tmp_path):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    a, b = pair(tmp_path, {"w": x}, {"w": x.clone()})
    assert shardwise.diff(a, b).equal
    assert shardwise.diff(a, b, rtol=1e-3).equal
    y = x.clone()
    y[0] = 2.0
    save_file({"w": y}, b)
    report = shardwise.diff(a, b, rtol=1e-3)
    assert not report.equal and report.mismatches[0].mismatched_elements == 1


def test_relative_tolerance_scales_with_magnitude(tmp_path):
    a, b = pair(tmp_path, {"w": torch.tensor([1000.0, 1.0])}, {"w": torch.tensor([1000.5, 1.0])})
    assert not shardwise.diff(a, b, rtol=1e-4).equal
    assert shardwise.diff(a, b, rtol=1e-3).equal
    assert not shardwise.diff(a, b, atol=0.4).equal
    assert shardwise.diff(a, b, atol=0.5).equal


def test_dtype_mismatch_is_a_difference_unless_tolerances_allow_values(tmp_path):
    w = torch.randn(64)
    a, b = pair(tmp_path, {"w": w}, {"w": w.to(torch.bfloat16)})
    exact = shardwise.diff(a, b)
    assert exact.mismatches[0].reason == "dtype"
    assert shardwise.diff(a, b, rtol=1e-2).equal
    assert not shardwise.diff(a, b, rtol=1e-5).equal


def test_large_tensors_are_compared_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(diff_module, "_CHUNK_ELEMENTS", 1000)
    w = torch.randn(10_500)
    v = w.clone()
    v[-1] += 3.0
    a, b = pair(tmp_path, {"w": w}, {"w": v})
    report = shardwise.diff(a, b)
    assert report.mismatches[0].mismatched_elements == 1
    assert report.mismatches[0].max_abs_diff == pytest.approx(3.0, rel=1e-5)


def test_strided_torch_views_compare_by_value(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"w": base.t()}, tmp_path / "view.pt")
    save_file({"w": base.t().contiguous()}, tmp_path / "c.safetensors")
    assert shardwise.diff(tmp_path / "view.pt", tmp_path / "c.safetensors").equal


def test_infinities_are_only_close_to_the_same_infinity(tmp_path):
    a, b = pair(tmp_path, {"w": torch.tensor([float("inf"), 1.0])}, {"w": torch.tensor([-float("inf"), float("inf")])})
    report = shardwise.diff(a, b, rtol=1e-3, atol=1.0)
    assert not report.equal and report.mismatches[0].mismatched_elements == 2
    assert report.mismatches[0].max_abs_diff == float("inf")


def test_large_integers_are_compared_exactly_even_with_tolerances(tmp_path):
    a, b = pair(tmp_path, {"w": torch.tensor([2**62])}, {"w": torch.tensor([2**62 + 100])})
    report = shardwise.diff(a, b, atol=0.0)
    assert not report.equal and report.mismatches[0].max_abs_diff == 100.0
