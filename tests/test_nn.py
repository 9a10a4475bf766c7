"""Module machinery, layers, initialisation and state_dicts (init as the original DDPM code)."""
import math

import numpy as np
import pytest

import minidiff
from minidiff import backend, nn
from minidiff.tensor import Tensor


class Block(nn.Module):
    def __init__(self):
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.drop = nn.Dropout(0.5)
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(3, 2, bias=False)])

    def forward(self, x):  # (N, 2, H, W) -> (N, 2)
        h = self.drop(self.norm(self.conv(x))).mean(axis=(2, 3))
        for head in self.heads:
            h = head(h)
        return h


def data(*shape, seed=0):
    return Tensor(backend.to_active(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)))


def test_parameters_are_registered_with_dotted_names_in_definition_order():
    minidiff.manual_seed(0)
    m = Block()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["conv.weight", "conv.bias", "norm.weight", "norm.bias",
                     "heads.0.weight", "heads.0.bias", "heads.1.weight"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert m.num_parameters() == 2 * 4 * 9 + 4 + 4 + 4 + 12 + 3 + 6
    assert [type(c).__name__ for c in m.children()] == ["Conv2d", "GroupNorm", "Dropout", "ModuleList"]
    assert len(m.modules()) == 7 and m.heads[1].bias is None and len(m.heads) == 2


def test_a_shared_parameter_is_listed_once():
    class Tied(nn.Module):
        def __init__(self):
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)
            self.b.weight = self.a.weight

    assert [n for n, _ in Tied().named_parameters()] == ["a.weight", "a.bias", "b.bias"]


def test_fan_avg_uniform_init_and_zero_biases():
    """U(-a, a), a = sqrt(3 scale / ((fan_in + fan_out) / 2)); conv fans count the k*k receptive field."""
    minidiff.manual_seed(0)
    lin, conv = nn.Linear(300, 100), nn.Conv2d(16, 32, 3)
    for w, fan_in, fan_out in ((lin.weight, 300, 100), (conv.weight, 16 * 9, 32 * 9)):
        w = backend.to_numpy(w.data)
        limit = math.sqrt(3.0 / ((fan_in + fan_out) / 2))
        assert w.dtype == np.float32 and np.abs(w).max() <= limit
        assert np.abs(w).max() > 0.98 * limit  # fills the interval
        assert w.std() == pytest.approx(limit / math.sqrt(3), rel=0.05)  # the uniform's std
    assert not backend.to_numpy(lin.bias.data).any() and not backend.to_numpy(conv.bias.data).any()
    near_zero = backend.to_numpy(nn.Conv2d(16, 32, 3, init_scale=0.0).weight.data)
    assert 0 < np.abs(near_zero).max() <= math.sqrt(3e-10 / ((16 * 9 + 32 * 9) / 2))  # scale 0 means 1e-10
    norm = nn.GroupNorm(4, 8)
    np.testing.assert_array_equal(backend.to_numpy(norm.weight.data), 1.0)
    np.testing.assert_array_equal(backend.to_numpy(norm.bias.data), 0.0)


def test_manual_seed_makes_models_reproducible(backend_name):
    """Weights are drawn on the host, so a seed gives the same numbers on numpy and cupy."""
    minidiff.manual_seed(3)
    a = Block().state_dict()
    minidiff.manual_seed(3)
    b = Block().state_dict()
    minidiff.manual_seed(4)
    c = Block().state_dict()
    backend.use_backend("numpy")
    minidiff.manual_seed(3)
    on_host = Block().state_dict()
    for k in a:
        np.testing.assert_array_equal(backend.to_numpy(a[k]), backend.to_numpy(b[k]))
        np.testing.assert_array_equal(backend.to_numpy(a[k]), on_host[k])
    assert not np.array_equal(backend.to_numpy(a["conv.weight"]), backend.to_numpy(c["conv.weight"]))


def test_layers_compute_their_formulas():
    minidiff.manual_seed(0)
    lin = nn.Linear(4, 3)
    lin.bias.data[...] = backend.to_active(np.array([1.0, 2.0, 3.0], np.float32))
    x = data(5, 4)
    want = backend.to_numpy(x.data) @ backend.to_numpy(lin.weight.data).T + [1.0, 2.0, 3.0]
    np.testing.assert_allclose(backend.to_numpy(lin(x).data), want, rtol=1e-5)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    np.testing.assert_array_equal(backend.to_numpy(seq(x).data), backend.to_numpy(seq[1](seq[0](x)).data))
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=(0, 1, 0, 1))
    assert conv(data(2, 3, 8, 8)).shape == (2, 5, 4, 4)
    g = nn.GroupNorm(2, 4, eps=1e-6)(data(3, 4, 5, 5))
    grouped = backend.to_numpy(g.data).reshape(3, 2, -1)
    np.testing.assert_allclose(grouped.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(grouped.std(-1), 1, rtol=1e-4)


def test_train_and_eval_toggle_dropout():
    minidiff.manual_seed(0)
    m = Block()
    x = data(4, 2, 6, 6)
    assert m.training and m.drop.training
    m.eval()
    assert not any(mod.training for mod in m.modules())
    drop = nn.Dropout(0.5).eval()
    assert drop(x) is x  # identity in eval
    np.testing.assert_array_equal(backend.to_numpy(m(x).data), backend.to_numpy(m(x).data))
    m.train()
    assert all(mod.training for mod in m.modules())
    drop.train()
    y = backend.to_numpy(drop(x).data)
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7  # about half the entries dropped
    np.testing.assert_allclose(y[kept], 2 * backend.to_numpy(x.data)[kept], rtol=1e-6)  # survivors scaled by 1/(1-p)
    assert not np.array_equal(backend.to_numpy(m(x).data), backend.to_numpy(m(x).data))


def test_state_dict_round_trip_through_a_file_is_bit_identical(tmp_path, backend_name):
    minidiff.manual_seed(0)
    a = Block().eval()
    state = a.state_dict()
    assert all(isinstance(k, str) for k in state)
    np.savez(tmp_path / "model.npz", **{k: backend.to_numpy(v) for k, v in state.items()})
    state["conv.weight"][...] = 0  # a copy: editing it leaves the model alone
    assert backend.to_numpy(a.conv.weight.data).any()
    minidiff.manual_seed(1)
    b = Block().eval()
    x = data(2, 2, 5, 5)
    assert not np.array_equal(backend.to_numpy(a(x).data), backend.to_numpy(b(x).data))
    weight_array = b.conv.weight.data
    with np.load(tmp_path / "model.npz") as f:
        b.load_state_dict(dict(f))
    assert b.conv.weight.data is weight_array  # copied in place: optimizers keep their references
    np.testing.assert_array_equal(backend.to_numpy(a(x).data), backend.to_numpy(b(x).data))


def test_load_state_dict_names_missing_unexpected_and_mismatched_keys_in_one_error():
    minidiff.manual_seed(0)
    m = Block()
    state = m.state_dict()
    del state["norm.bias"]
    state["heads.2.weight"] = np.zeros((2, 2), np.float32)
    state["conv.weight"] = np.zeros((4, 2, 5, 5), np.float32)
    with pytest.raises(ValueError) as err:
        m.load_state_dict(state)
    msg = str(err.value)
    assert "missing keys: norm.bias" in msg and "unexpected keys: heads.2.weight" in msg
    assert "conv.weight: checkpoint (4, 2, 5, 5) vs model (4, 2, 3, 3)" in msg
    before = backend.to_numpy(m.heads[0].weight.data).copy()
    state["heads.0.weight"] = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError):
        m.load_state_dict(state, strict=False)  # a wrong shape is never tolerated
    np.testing.assert_array_equal(backend.to_numpy(m.heads[0].weight.data), before)  # nothing half-loaded
    state["conv.weight"] = np.zeros((4, 2, 3, 3), np.float32)
    m.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(backend.to_numpy(m.heads[0].weight.data), 1.0)


def test_invalid_layer_arguments_raise():
    with pytest.raises(ValueError, match="6 channels cannot be split into 4"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="in_features=0"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError):
        nn.Dropout(1.0)
    with pytest.raises(TypeError):
        nn.ModuleList([nn.Linear(2, 2), "not a module"])


def test_embedding_looks_up_rows_and_scatters_gradients_back():
    from minidiff.nn import Embedding
    from minidiff.testing import check_gradients
    minidiff.manual_seed(0)
    emb = Embedding(5, 3)
    assert emb.weight.shape == (5, 3) and repr(emb) == "Embedding(5, 3)"
    index = np.array([4, 0, 4, 2])
    w = backend.to_numpy(emb.weight.data)
    np.testing.assert_array_equal(backend.to_numpy(emb(index).data), w[index])
    # d out[i] / d weight[index[i]] = I: repeated rows accumulate, unused rows get zero
    def lookup(weight):
        emb.weight = weight
        return emb(index)

    check_gradients(lookup, [w.astype(np.float64)])
    with pytest.raises(ValueError, match="positive"):
        Embedding(0, 3)
