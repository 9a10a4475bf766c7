"""Adam/AdamW, warmup, clipping and the parameter EMA against hand-computed values (Ho et al. 2020, App. B)."""
import math

import numpy as np
import pytest
from conftest import compat_import

import minidiff
from minidiff import backend, nn
from minidiff.kernels.optim import FlatParameters
from minidiff.optim import EMA, Adam, clip_grad_norm_


def param(values, dtype=np.float32):
    return nn.Parameter(backend.to_active(np.array(values, dtype=dtype)))  # a copy: updates are in place


def host(a):
    return backend.to_numpy(a.data if isinstance(a, minidiff.Tensor) else a)  # a cupy array's .data is a pointer


pytestmark = pytest.mark.usefixtures("kernels_mode")   # the per-parameter math and the flat-buffer kernel alike


def set_grad(p, values):
    p.grad = backend.to_active(np.asarray(values, dtype=p.dtype))


def test_adam_matches_the_closed_form_update_on_a_quadratic(backend_name):
    """f(p) = 0.5 sum(a p^2), g = a p; three steps replayed with scalar Python arithmetic."""
    a = np.array([1.0, -2.0, 0.5, 3.0])
    p0 = np.array([1.0, 0.5, -2.0, 0.25])
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = param(p0, np.float64)
    opt = Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    ref, m, v = p0.copy(), np.zeros(4), np.zeros(4)
    for t in range(1, 4):
        g = a * ref
        set_grad(p, a * host(p))
        opt.step()
        for i in range(4):  # Kingma & Ba, Algorithm 1, one coordinate at a time
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            ref[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
        np.testing.assert_allclose(host(p), ref, rtol=1e-12, atol=0)
    # The first step moves every coordinate by lr against the sign of its gradient.
    first = Adam([q := param(p0, np.float64)], lr=lr)
    set_grad(q, a * p0)
    first.step()
    np.testing.assert_allclose(host(q), p0 - lr * np.sign(a * p0), rtol=1e-7)


def test_adam_keeps_float32_and_updates_in_place():
    """Adam adopts the parameter into its flat buffer when built; every step after that is in place."""
    p = param(np.ones((3, 2)))
    opt = Adam([p], lr=1e-3, weight_decay=0.1, grad_clip=1.0, warmup_steps=10)
    data_before = p.data
    np.testing.assert_array_equal(host(p), np.ones((3, 2)))  # adoption keeps the values
    for _ in range(2):
        set_grad(p, np.full((3, 2), 5.0))
        opt.step()
    assert p.data is data_before and p.dtype == np.float32
    assert opt.exp_avg[0].dtype == np.float32 and opt.exp_avg_sq[0].dtype == np.float32


def test_adam_matches_torch_adamw_with_warmup_and_clipping():
    torch = compat_import("torch")
    rng = np.random.default_rng(0)
    w0, target = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    p = param(w0, np.float64)
    opt = Adam([p], lr=0.05, weight_decay=0.1, warmup_steps=3, grad_clip=0.5)
    tp = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: min(1.0, (s + 1) / 3))  # s counts from 0
    for _ in range(8):
        set_grad(p, 3 * (host(p) - target))
        norm = opt.step()
        topt.zero_grad()
        (1.5 * ((tp - torch.tensor(target)) ** 2).sum()).backward()
        tnorm = float(torch.nn.utils.clip_grad_norm_([tp], 0.5))
        topt.step()
        sched.step()
        assert norm == pytest.approx(tnorm, rel=1e-10)
        # torch clips by max_norm / (norm + 1e-6), tf and minidiff by max_norm / max(norm, max_norm)
        np.testing.assert_allclose(host(p), tp.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_adamw_decay_is_decoupled_from_the_gradient():
    """With a zero gradient the Adam term vanishes and only p *= 1 - lr * weight_decay remains."""
    p = param([2.0, -4.0], np.float64)
    opt = Adam([p], lr=0.1, weight_decay=0.5)
    for step in (1, 2):
        set_grad(p, [0.0, 0.0])
        opt.step()
        np.testing.assert_allclose(host(p), np.array([2.0, -4.0]) * 0.95 ** step, rtol=1e-14)
    q = param([2.0, -4.0], np.float64)
    plain = Adam([q], lr=0.1)
    set_grad(q, [0.0, 0.0])
    plain.step()
    np.testing.assert_array_equal(host(q), [2.0, -4.0])


def test_linear_warmup_learning_rates():
    p = param([0.0], np.float64)
    opt = Adam([p], lr=1.0, warmup_steps=4)
    assert [opt.current_lr(s) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    moved = []
    for _ in range(5):
        before = host(p).copy()
        set_grad(p, [1.0])
        opt.step()
        moved.append(float(before[0] - host(p)[0]))
    # A constant gradient makes m_hat / sqrt(v_hat) = 1, so each move is the step's learning rate.
    np.testing.assert_allclose(moved, [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-6)
    assert Adam([p], lr=0.3).current_lr(1) == 0.3  # no warmup


def test_clip_grad_norm_scales_to_max_norm_and_leaves_small_gradients_alone():
    a, b = param(np.zeros(3)), param(np.zeros((2, 2)))
    set_grad(a, [3.0, 0.0, 4.0])
    set_grad(b, [[0.0, 12.0], [0.0, 0.0]])  # global norm sqrt(9 + 16 + 144) = 13
    assert clip_grad_norm_([a, b], 1.0) == pytest.approx(13.0)
    total = math.sqrt(float((host(a.grad) ** 2).sum() + (host(b.grad) ** 2).sum()))
    assert total == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(host(a.grad), np.array([3.0, 0.0, 4.0]) / 13, rtol=1e-6)
    small = host(a.grad).copy()
    assert clip_grad_norm_([a, b], 5.0) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(host(a.grad), small)  # scale exactly 1 below max_norm


def test_adam_clips_before_its_moments_and_returns_the_preclip_norm():
    p = param([0.0, 0.0], np.float64)
    opt = Adam([p], lr=0.1, betas=(0.9, 0.999), grad_clip=1.0)
    set_grad(p, [6.0, 8.0])
    assert opt.step() == pytest.approx(10.0)
    np.testing.assert_allclose(host(opt.exp_avg[0]), 0.1 * np.array([0.6, 0.8]), rtol=1e-12)
    np.testing.assert_array_equal(host(p.grad), [6.0, 8.0])  # p.grad itself is not modified


class Tiny(nn.Module):
    def __init__(self):
        self.lin = nn.Linear(3, 2)
        self.scale = param([1.0, 2.0])


def test_ema_after_k_updates_of_a_constant_is_the_closed_form():
    """s_k = c + decay^k (s_0 - c) when the parameter is held at c."""
    minidiff.manual_seed(0)
    model, decay, k = Tiny(), 0.9, 7
    s0 = {name: host(p).astype(np.float64) for name, p in model.named_parameters()}
    ema = EMA(model, decay=decay)
    for p in model.parameters():
        p.data[...] = 3.0
    for _ in range(k):
        ema.update(model)
    for name, s in ema.shadow.items():
        np.testing.assert_allclose(backend.to_numpy(s), 3.0 + decay ** k * (s0[name] - 3.0), rtol=1e-5)
    assert ema.num_updates == k


def test_ema_swapped_puts_the_average_in_and_restores_the_live_weights():
    minidiff.manual_seed(0)
    model = Tiny()
    ema = EMA(model, decay=0.5)
    live = {n: host(p).copy() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data[...] = 1.0
    ema.update(model)  # shadow = (s0 + 1) / 2, live = 1
    with ema.swapped(model):
        for n, p in model.named_parameters():
            np.testing.assert_allclose(host(p), (live[n] + 1.0) / 2, rtol=1e-6, atol=1e-7)  # float32 rounding
    for p in model.parameters():
        np.testing.assert_array_equal(host(p), 1.0)
    with pytest.raises(RuntimeError):
        with ema.swapped(model):
            raise RuntimeError("sampling failed")
    for p in model.parameters():  # restored on the way out of an exception too
        np.testing.assert_array_equal(host(p), 1.0)
    ema.copy_to(model)
    np.testing.assert_allclose(host(model.lin.weight), (live["lin.weight"] + 1) / 2, rtol=1e-6, atol=1e-7)


def _run(model, opt, ema, steps, data):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        d = model.lin(x) * model.scale - y
        (d * d).mean().backward()
        opt.step()
        ema.update(model)


def test_optimizer_and_ema_state_dicts_resume_exactly(tmp_path):
    """Save after 4 steps (to a safetensors file), rebuild from another seed, load: 4 more steps are bit-identical."""
    from safetensors.numpy import load_file, save_file
    rng = np.random.default_rng(0)
    data = [minidiff.Tensor(backend.to_active(rng.standard_normal(s).astype(np.float32))) for s in ((6, 3), (6, 2))]

    def build(seed):
        minidiff.manual_seed(seed)
        model = Tiny()
        return model, Adam(model.parameters(), lr=0.05, weight_decay=0.01, warmup_steps=3, grad_clip=0.5), \
            EMA(model, decay=0.9)

    model, opt, ema = build(0)
    _run(model, opt, ema, 4, data)
    state = {**{f"model.{k}": v for k, v in model.state_dict().items()},
             **{f"opt.{k}": v for k, v in opt.state_dict().items()},
             **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    assert all(isinstance(k, str) for k in state) and state["opt.step"].shape == ()
    save_file({k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in state.items()}, tmp_path / "ck.safetensors")
    _run(model, opt, ema, 4, data)

    model2, opt2, ema2 = build(1)
    loaded = load_file(tmp_path / "ck.safetensors")
    part = lambda prefix: {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}  # noqa: E731
    model2.load_state_dict(part("model."))
    opt2.load_state_dict(part("opt."))
    ema2.load_state_dict(part("ema."))
    assert opt2.step_count == 4 and opt2.grad_clip == 0.5 and opt2.warmup_steps == 3
    _run(model2, opt2, ema2, 4, data)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=n)
    for n in ema.shadow:
        np.testing.assert_array_equal(backend.to_numpy(ema.shadow[n]), backend.to_numpy(ema2.shadow[n]))


def test_state_dict_errors_name_the_keys():
    p = param(np.zeros(3))
    opt = Adam([p])
    state = opt.state_dict()
    del state["exp_avg.0"]
    state["exp_avg_sq.0"] = np.zeros(4, np.float32)
    state["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: exp_avg\.0.*unexpected keys: extra.*exp_avg_sq\.0: checkpoint \(4,\) vs model \(3,\)"):
        opt.load_state_dict(state)
    ema_state = EMA(Tiny()).state_dict()
    ema_state.pop("shadow.scale")
    with pytest.raises(ValueError, match="shadow.scale"):
        EMA(Tiny()).load_state_dict(ema_state)


def test_invalid_hyperparameters_raise():
    p = param([0.0])
    for kwargs in (dict(lr=-1), dict(betas=(1.0, 0.9)), dict(grad_clip=0.0), dict(warmup_steps=-1)):
        with pytest.raises(ValueError):
            Adam([p], **kwargs)
    with pytest.raises(ValueError):
        Adam([])


# ---------------------------------------------------------------- the flat buffer


def _views_of(flat_array, arrays):
    """True when every array is a view into `flat_array`'s memory (on numpy or cupy)."""
    return all(backend.xp_of(a).shares_memory(a, flat_array) for a in arrays)


def test_parameters_and_gradients_live_in_one_flat_buffer(backend_name):
    """backward() writes straight into the flat gradient buffer; Adam and the EMA share one FlatParameters."""
    minidiff.manual_seed(0)
    model = Tiny()
    values = {n: host(p).copy() for n, p in model.named_parameters()}
    opt, ema = Adam(model.parameters(), lr=0.1), EMA(model, decay=0.5)
    flat = opt.flat
    assert FlatParameters.of(model.parameters()) is flat
    assert flat.data.ndim == 1 and flat.data.size == model.num_parameters() == flat.grad.size
    assert _views_of(flat.data, [p.data for p in model.parameters()])
    for n, p in model.named_parameters():  # adoption kept every value, at its slice
        np.testing.assert_array_equal(host(p), values[n])
    x = minidiff.Tensor(backend.to_active(np.ones((4, 3), np.float32)))
    (model.lin(x) * model.scale).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert _views_of(flat.grad, grads)
    for p, (lo, hi) in zip(model.parameters(), flat.slices):
        np.testing.assert_array_equal(backend.to_numpy(flat.grad[lo:hi]), host(p.grad).ravel())
    # A second backward without zero_grad accumulates in place, as before.
    first = [host(g).copy() for g in grads]
    (model.lin(x) * model.scale).sum().backward()
    for f, p in zip(first, model.parameters()):
        np.testing.assert_allclose(host(p.grad), 2 * f, rtol=1e-6)
    assert flat.gather_grads() == [(0, flat.size)]
    opt.step()
    ema.update(model)
    assert _views_of(flat.data, [p.data for p in model.parameters()])


def test_flat_adam_matches_per_parameter_adam_with_skipped_parameters():
    """Each parameter follows its own closed-form Adam; one without a gradient is skipped (moments and all)."""
    ps = [param([1.0, -2.0], np.float64), param([[0.5], [3.0]], np.float64), param([4.0], np.float64)]
    opt = Adam(ps, lr=0.1, weight_decay=0.2, grad_clip=2.0)
    single = [Adam([q], lr=0.1, weight_decay=0.2) for q in (param([1.0, -2.0], np.float64),
                                                              param([4.0], np.float64))]
    g = {0: np.array([1.0, 2.0]), 2: np.array([-2.0])}
    set_grad(ps[0], g[0])
    ps[1].grad = None
    set_grad(ps[2], g[2])
    assert opt.flat.gather_grads() == [(0, 2), (4, 5)]
    norm = opt.step()
    assert norm == pytest.approx(3.0)
    np.testing.assert_array_equal(host(ps[1]), [[0.5], [3.0]])  # no gradient: untouched
    np.testing.assert_array_equal(host(opt.exp_avg[1]), 0.0)
    scale = 2.0 / 3.0  # the global clip scales both gradients alike
    for q, s, i in zip(single, (0, 1), (0, 2)):
        set_grad(q.params[0], g[i] * scale)
        q.step()
        np.testing.assert_allclose(host(ps[i]), host(q.params[0]), rtol=1e-12)


def test_flat_buffer_readopts_rebound_data_and_hand_set_grads(kernels_mode):
    p = param([1.0, 2.0])
    opt = Adam([p], lr=0.5)
    p.data = backend.to_active(np.array([5.0, 6.0], np.float32))  # rebound behind the optimizer's back
    set_grad(p, [1.0, 1.0])
    opt.step()
    np.testing.assert_allclose(host(p), [4.5, 5.5], rtol=1e-6)  # the new values were the ones updated
    assert _views_of(opt.flat.data, [p.data])                  # the EMA and checkpoints read the shared buffer
    if kernels_mode == "fast":                                 # the kernel also gathers hand-set gradients in
        assert _views_of(opt.flat.grad, [p.grad])


def test_flat_buffer_refuses_mixed_dtypes_and_duplicates():
    with pytest.raises(ValueError, match="one dtype and backend.*float32.*float64|one dtype and backend.*float64"):
        FlatParameters([param([1.0]), param([1.0], np.float64)])
    p = param([1.0])
    with pytest.raises(ValueError, match="twice"):
        FlatParameters([p, p])


def test_checkpoints_of_the_per_parameter_optimizer_still_load():
    """The state_dict format is unchanged: per-parameter exp_avg.i / exp_avg_sq.i / shadow.name keys."""
    minidiff.manual_seed(0)
    model = Tiny()
    opt, ema = Adam(model.parameters()), EMA(model)
    state = opt.state_dict()
    kinds = ("exp_avg", "exp_avg_sq")
    assert sorted(k for k in state if "." in k) == sorted(f"{k}.{i}" for i in range(3) for k in kinds)
    old = {**state, **{f"exp_avg.{i}": np.full(p.shape, i + 1.0, np.float32) for i, p in enumerate(model.parameters())}}
    opt.load_state_dict(old)
    for i, p in enumerate(model.parameters()):
        np.testing.assert_array_equal(backend.to_numpy(opt.exp_avg[i]), np.full(p.shape, i + 1.0))
    assert _views_of(opt.flat_exp_avg, opt.exp_avg)
    shadows = [f"shadow.{n}" for n, _ in model.named_parameters()]
    assert sorted(ema.state_dict()) == sorted(["decay", "num_updates", *shadows])


class _Holder(nn.Module):
    def __init__(self, params):
        for i, p in enumerate(params):
            setattr(self, f"p{i}", p)
