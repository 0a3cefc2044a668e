"""Zero-copy pickling: tensors and arrays travel as out-of-band buffers and come back equal."""

from __future__ import annotations

import numpy as np
import torch

from torchrunx.transport import serialization


def roundtrip(obj: object) -> object:
    frames = serialization.dumps(obj)
    # what a receiver gets: separate writable buffers
    return serialization.loads([bytearray(f) for f in frames])


def test_large_tensor_is_one_out_of_band_buffer() -> None:
    t = torch.arange(2**20, dtype=torch.float32)
    frames = serialization.dumps(t)
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == t.nbytes
    assert len(memoryview(frames[0])) < 1000


def test_tensors_of_every_kind_roundtrip() -> None:
    base = torch.randn(8, 8)
    values = {
        "f32": base,
        "bf16": base.to(torch.bfloat16),
        "int": torch.arange(10),
        "bool": base > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "slice": base[2:5, 1::2],
        "param": torch.nn.Parameter(torch.ones(2)),
        "grad": torch.ones(3, requires_grad=True),
        "array": np.arange(6).reshape(2, 3),
    }
    back = roundtrip(values)
    assert isinstance(back, dict)
    for key, value in values.items():
        got = back[key]
        assert type(got) is type(value), key
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype, key
            assert got.requires_grad == value.requires_grad, key
            assert torch.equal(got.detach(), value.detach()), key
        else:
            assert np.array_equal(got, value)


def test_views_of_one_storage_still_share_it() -> None:
    base = torch.zeros(10)
    back = roundtrip([base, base[3:6]])
    assert isinstance(back, list)
    back[1].fill_(1)
    assert back[0][3:6].tolist() == [1, 1, 1]


def test_module_with_tied_weights_stays_tied() -> None:
    emb = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    back = roundtrip(torch.nn.Sequential(emb, head))
    assert isinstance(back, torch.nn.Sequential)
    assert back[0].weight is back[1].weight
