import torch

from recopt.verify import compare_outputs, flatten_outputs, random_like_inputs


def test_equal_outputs_pass_and_small_fp32_noise_passes():
    a = torch.randn(10, 10)
    assert compare_outputs(a, a.clone()) is None
    assert compare_outputs(a, a + 1e-7 * torch.randn(10, 10)) is None


def test_large_difference_names_output_and_size():
    a = {"logits": torch.randn(4), "aux": (torch.randn(3), torch.randn(2))}
    b = {"logits": a["logits"].clone(), "aux": (a["aux"][0].clone(), a["aux"][1] + 0.5)}
    m = compare_outputs(a, b)
    assert m is not None and "aux" in m.output and "[1]" in m.output
    assert m.max_abs_diff > 0.4


def test_shape_dtype_and_nan_mismatches():
    a = torch.randn(3)
    assert "shape" in compare_outputs(a, torch.randn(4)).message
    assert "dtype" in compare_outputs(a, a.double()).message
    b = a.clone(); b[1] = float("nan")
    assert "non-finite" in compare_outputs(a, b).message
    # Same NaN positions are fine.
    assert compare_outputs(b, b.clone()) is None


def test_bf16_tolerance_is_looser_than_fp32():
    a = torch.randn(100)
    b = a * (1 + 5e-3)
    assert compare_outputs(a, b) is not None
    assert compare_outputs(a.bfloat16(), b.bfloat16()) is None


def test_structure_only_check_for_architecture_passes():
    a = torch.randn(5)
    assert compare_outputs(a, torch.randn(5), check_values=False) is None
    bad = torch.randn(5); bad[0] = float("inf")
    assert compare_outputs(a, bad, check_values=False) is not None


def test_random_like_inputs_keeps_ids_valid_and_offsets_intact():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (20,))
    offsets = torch.tensor([0, 3, 3, 10])
    x = torch.randn(4, 3) * 5 + 2
    ids2, off2, x2 = random_like_inputs((ids, offsets, x), g)
    assert sorted(ids2.tolist()) == sorted(ids.tolist())
    assert torch.equal(off2, offsets)
    assert x2.shape == x.shape and not torch.equal(x2, x)


def test_flatten_names_nested_leaves():
    names = [n for n, _ in flatten_outputs((torch.zeros(1), {"a": torch.zeros(1)}))]
    assert names == ["output[0]", "output[1]['a']"]


def test_random_floats_stay_in_the_example_range():
    g = torch.Generator().manual_seed(0)
    times = torch.rand(4, 10) * 1e6  # non-negative, like timestamps
    (t2,) = random_like_inputs((times,), g)
    assert float(t2.min()) >= 0 and float(t2.max()) <= float(times.max())
    assert not torch.equal(t2, times)
