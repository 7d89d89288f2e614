"""recopt.ops._triton_spec.SpecBuilder: the launch-signature rules the compile check uses."""
import torch

from recopt.ops._triton_spec import TYPES, SpecBuilder


def test_spec_builder_rules():
    sb = SpecBuilder(torch.bfloat16)
    sb.pointers(("Q", "O")).pointers(("M",), "fp32").strides(("sqb sqt sqh sqd",))
    sb.attention_scalars(d=64, gqa=False).constexprs(BLOCK_M=64)
    s = sb.build("k/x", "mod", "kern", num_warps=4, num_stages=2, tags={"family": "t"})
    assert s.signature["Q"] == "*bf16" and s.signature["M"] == "*fp32"
    assert s.constexprs["sqd"] == 1 and "sqd" not in s.signature          # the contiguous dim
    assert s.constexprs["GROUP"] == 1 and "GROUP" not in s.signature      # no GQA
    assert {"Q", "O", "M", "sqb", "sqt", "sqh", "D", "DV"} <= set(s.divisible)
    assert "window" not in s.divisible and "sqd" not in s.divisible
    assert s.signature["qk_scale"] == "fp32" and s.num_warps == 4 and s.num_stages == 2
    small = SpecBuilder(torch.float32).attention_scalars(d=8, gqa=True)
    assert "D" not in small.div and small.sig["GROUP"] == "i32"         # d < 16: not divisible
    assert TYPES[torch.float16] == "fp16"


def test_a_constexpr_wins_over_a_runtime_type():
    sb = SpecBuilder(torch.float16).ints(("T_Q",)).constexprs(T_Q=1).divisible("T_Q")
    s = sb.build("n", "m", "a", 1, 1, {})
    assert "T_Q" not in s.signature and s.constexprs["T_Q"] == 1 and "T_Q" not in s.divisible
