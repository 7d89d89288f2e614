import pytest

import recopt
from recopt.targets import PROFILES, Target, get_target


def test_every_profile_round_trips_through_json():
    for name, t in PROFILES.items():
        back = Target.from_json(t.to_json())
        assert back == t, name
        assert back.source, f"{name} must cite where its figures come from"


def test_gpu_profiles_have_peaks_and_features():
    h100 = get_target("h100")
    assert h100.peak_fp8_tflops > h100.peak_bf16_tflops > 0
    assert h100.has("fp8") and h100.has("wgmma") and h100.has("tma")
    assert get_target("b200").has("tcgen05")
    assert not get_target("a100").has("fp8")
    assert get_target("h200").hbm_gbps > h100.hbm_gbps


def test_auto_on_this_machine_is_cpu_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert get_target("auto").name == "cpu"


def test_unknown_target_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_target("h900")
    for name in ("b200", "h100", "h200", "a100", "cpu", "auto"):
        assert name in str(e.value)


def test_roofline_is_max_of_compute_and_memory_time():
    t = get_target("h100")
    flops, nbytes = 2 * 4096**3, 3 * 4096 * 4096 * 2
    s = t.roofline_seconds(flops, nbytes)
    assert s == pytest.approx(max(flops / 989e12, nbytes / 3350e9))
    assert get_target("cpu").roofline_seconds(flops, nbytes) is None


def test_target_from_dict_rejects_unknown_fields():
    d = get_target("h100").to_dict()
    d["tensor_cores_per_sm"] = 4
    with pytest.raises(ValueError, match="tensor_cores_per_sm"):
        recopt.Target.from_dict(d)


def test_cpu_default_backend_is_data_and_round_trips():
    from recopt.lower import default_backend
    from recopt.targets import Target

    cpu = get_target("cpu")
    assert cpu.default_backend == "eager" and default_backend(cpu) == "eager"
    assert default_backend(get_target("h100")) == "inductor"
    custom = Target.from_json(Target(name="mycpu", device="cpu", default_backend="inductor").to_json())
    assert default_backend(custom) == "inductor"
