"""Export edge cases: per-table id ranges in parity inputs, format-aware ParityError, bf16 on onnxruntime,
nn.TransformerEncoder's fast path."""
import importlib
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

rx = importlib.import_module("recopt.export")  # noqa: E402
from recopt.errors import InputError  # noqa: E402
from recopt.export import parity  # noqa: E402


class MultiTask(nn.Module):
    """Two tasks over tables of very different sizes; ids[:, j] indexes table j."""

    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Embedding(3, 4), nn.Embedding(1000, 4)
        self.ctr, self.cvr = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, ids):
        h = torch.cat([self.small(ids[:, 0]), self.big(ids[:, 1])], -1)
        return self.ctr(h).squeeze(-1), torch.sigmoid(self.cvr(h)).squeeze(-1)


def multitask_ids(b=5):
    return torch.stack([torch.tensor([0, 1, 2, 1, 0])[:b], torch.tensor([999, 5, 700, 123, 42])[:b]], 1)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_multi_table_ids_stay_in_each_tables_range(tmp_path, fmt):
    torch.manual_seed(0)
    res = rx.export(MultiTask().train(), (multitask_ids(),), str(tmp_path / f"mt.{fmt}"), n_random_inputs=3)
    assert len(res.manifest["parity"]["runs"]) == 8  # 4 input sets x 2 outputs, no IndexError


@pytest.mark.parametrize("b", [1, 2, 5])
def test_sampled_ids_come_from_their_own_column(b):
    ex = multitask_ids(b)
    g = torch.Generator().manual_seed(0)
    new = parity._sample_like(ex, (37, 2), g, dynamic_axes=[0])
    assert new.shape == (37, 2) and new.dtype == ex.dtype
    for j in range(2):
        assert set(new[:, j].tolist()) <= set(ex[:, j].tolist())
    three = torch.arange(24).reshape(2, 3, 4)  # [batch, seq, features]: both leading axes dynamic
    s = parity._sample_like(three, (5, 7, 4), g, dynamic_axes=[0, 1])
    for f in range(4):
        assert set(s[..., f].flatten().tolist()) <= set(three[..., f].flatten().tolist())


def test_model_failing_on_random_inputs_is_a_clear_input_error(tmp_path):
    class EagerOnlyCheck(nn.Module):
        def forward(self, x):
            if not torch.compiler.is_exporting() and x.shape[0] != 4:  # e.g. a lookup sized to batch 4
                raise IndexError("index out of range in self")
            return x * 2

    with pytest.raises(InputError, match="fails on random inputs.*IndexError.*parity_inputs"):
        rx.export(EagerOnlyCheck(), (torch.randn(4, 3),), str(tmp_path / "s.pt2"))


class Counter(nn.Module):
    """Its output depends on Python state that torch.export freezes at capture."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_parity_error_names_format_output_difference_and_never_suggests_the_same_format(tmp_path):
    with pytest.raises(rx.ParityError) as e:
        rx.export(Counter(), (torch.rand(3, 2) + 1,), str(tmp_path / "c.pt2"), output_names=["score"])
    msg = str(e.value)
    assert msg.startswith("pt2 export") and "output 'score'" in msg and "largest difference" in msg
    assert "format='pt2'" not in msg and "What to do:" in msg
    with pytest.raises(rx.ParityError) as e:
        rx.export(Counter(), (torch.rand(3, 2) + 1,), str(tmp_path / "c.onnx"))
    assert str(e.value).startswith("onnx export") and "format='pt2'" in str(e.value)


def test_bf16_model_on_onnxruntime_names_the_op(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16).eval()
    with pytest.raises(rx.ExportError, match=r"op Gemm .*bfloat16.*model\.float\(\).*format='pt2'"):
        rx.export(model, (torch.randn(2, 4, dtype=torch.bfloat16),), str(tmp_path / "bf.onnx"))
    res = rx.export(model, (torch.randn(2, 4, dtype=torch.bfloat16),), str(tmp_path / "bf.pt2"))  # pt2 keeps bf16
    assert res.manifest["inputs"][0]["dtype"] == "bfloat16"


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2)

    def forward(self, x, lengths):
        mask = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
        return self.enc(x, src_key_padding_mask=mask)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_exports_without_the_fast_path_mismatch(tmp_path, fmt, mode):
    torch.manual_seed(0)
    model = Encoder().train(mode == "train")
    # every row keeps at least one key: a row with all keys masked is NaN in ONNX (plain softmax)
    x, lengths = torch.randn(4, 6, 16), torch.tensor([6, 3, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rx.export(model, (x, lengths), str(tmp_path / f"enc.{fmt}"), dynamic_batch=False,
                        n_random_inputs=0)
    assert res.manifest["parity"]["runs"][0]["rel"] < 1e-4
    assert model.training == (mode == "train")
    assert torch.backends.mha.get_fastpath_enabled()  # restored after export
