"""Tensor and reverse-mode autograd: the core every other module builds on.

A `Tensor` wraps one numpy or cupy array. Each differentiable op is a `Function`
whose `forward` and `backward` see raw arrays only; `Function.apply` records the
graph, and `Tensor.backward` walks it output-to-inputs in reverse topological
order, iteratively (no recursion), accumulating the gradients of reused tensors.
May import: backend. The operators (+, @, ...) are bound in ops.py.

Dtype policy:
- Python numbers and lists become float32 (`backend.DTYPE`); bools and integers
  in an *array* keep their integer dtype (timesteps, labels, indices).
- An array stays on its own backend (numpy or cupy); move host data with
  `backend.to_active` first. Numbers and lists go to the active backend.
- numpy/cupy float32 and float64 arrays keep their dtype; float16 is widened to
  float32. Complex, string and object data are rejected.
- An op between two tensors follows NumPy's promotion: float32 with float64 gives
  float64. A Python scalar never promotes (float32 tensor * 2.0 stays float32).
- Only floating tensors can require gradients; gradients have their tensor's dtype.
"""
import contextlib

from . import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Within this block ops record no graph (sampling, evaluation, EMA updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    """False inside `no_grad()`."""
    return _grad_enabled


def _as_array(data, dtype=None):
    """Convert user data to an array of the active backend following the dtype policy."""
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data):
        array = data
    elif hasattr(data, "dtype") and hasattr(data, "shape"):  # a numpy scalar such as numpy.float32(0.1)
        array = backend.to_active(data)
    else:
        if isinstance(data, (bool, int, float)) or (isinstance(data, (list, tuple))):
            try:
                probe = backend.host.asarray(data)
            except ValueError as err:  # ragged nested lists
                raise ValueError(f"Tensor data must be rectangular; got a ragged {type(data).__name__}: {err}") from None
            if probe.dtype.kind not in "biuf":
                raise TypeError(f"Tensor data must be numeric; got a {type(data).__name__} holding {probe.dtype} values")
            array = backend.to_active(probe, dtype=dtype or backend.DTYPE)
        else:
            raise TypeError(f"Tensor data must be a number, a list of numbers or a numpy/cupy array; "
                            f"got {type(data).__name__}")
    kind = array.dtype.kind
    if kind not in "biuf":
        raise TypeError(f"Tensor data must be numeric; got an array of dtype {array.dtype}")
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    elif kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(backend.DTYPE)
    return array


class Tensor:
    """An n-dimensional array that can record the ops applied to it and differentiate them."""

    __array_ufunc__ = None  # make numpy defer `ndarray * Tensor` to Tensor.__rmul__
    # Where backward() writes this leaf's gradient, when set: its view into a flat gradient
    # buffer (optim.FlatParameters sets it), so an optimizer finds every gradient in one array.
    grad_into = None

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)  # numpy.ndarray or cupy.ndarray
        self.grad = None  # same shape, dtype and backend as data once backward() ran
        self._node = None  # the graph record (_Node) of a computed tensor, set by Function.apply
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_()

    def requires_grad_(self, flag=True):
        """Mark this tensor as a leaf whose gradient backward() should fill; returns self."""
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"only floating tensors can require gradients; this one is {self.data.dtype}")
        self.requires_grad = bool(flag)
        return self

    # Graph links live in the _Node, not the Tensor: the graph must not keep an intermediate's array alive.
    @property
    def _fn(self):
        return None if self._node is None else self._node._fn

    @property
    def _ctx(self):
        return None if self._node is None else self._node._ctx

    @property
    def _parents(self):
        return () if self._node is None else self._node._parents

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return int(self.data.size)

    def __len__(self):
        return self.data.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def numpy(self):
        """A host numpy copy of the data (a GPU sync on cupy)."""
        return backend.to_numpy(self.data)

    def item(self):
        """The value of a one-element tensor as a Python number (a GPU sync on cupy)."""
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element; this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    def backward(self, grad=None, retain_graph=False):
        """Fill `.grad` of every leaf that this tensor depends on (reverse-mode autodiff).

        Without `grad` the tensor must hold one element (a loss); d(self)/d(self) = 1.
        The graph's saved arrays are freed as backward goes unless `retain_graph`.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad: "
                               "no input of the computation had requires_grad=True (or it ran under no_grad())")
        xp = backend.xp_of(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar (one-element) tensor; this one "
                                   f"has shape {self.shape}: reduce it first (e.g. .sum() or .mean()) or pass grad=")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, self.data.dtype)
            if backend.xp_of(grad) is not xp:  # moved to the tensor's backend: a host .grad on a device tensor
                grad = backend.to_backend_of(grad, self.data)  # would break every optimizer step after it
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(grad): grad has shape {tuple(grad.shape)} but the tensor has shape {self.shape}")
        root = self if self._node is None else self._node
        order = _topological_order(root)
        grads = {id(root): grad}
        given = set()  # ids of arrays already handed to a leaf in this pass
        while order:
            node = order.pop()  # popping drops our reference, so used activations can be freed
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._fn is None:  # a leaf: accumulate across backward() calls, as PyTorch does
                _accumulate_leaf_grad(node, g, given)
                continue
            if node._ctx is None:
                raise RuntimeError("backward() through a graph whose saved arrays were already freed; "
                                   "call the first backward() with retain_graph=True to go through it twice")
            parent_grads = node._fn.backward(node._ctx, g)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            for parent, pg in zip(node._parents, parent_grads):
                if pg is None or not isinstance(parent, (Tensor, _Node)) or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg  # a reused tensor sums its terms
            if not retain_graph:
                node._ctx, node._parents = None, ()


def _accumulate_leaf_grad(leaf, g, given):
    """leaf.grad += g, where leaf.grad must end up an array that belongs to this leaf alone.

    Why "alone": optimizers update .grad in place, so a leaf must never hold a view of another
    array, nor an array already handed to another leaf in this pass (`given`: a backward such as
    Add's may return one array for both inputs). A leaf with `grad_into` (a parameter in
    optim.FlatParameters) gets its gradient written into its slot of the flat buffer instead.
    """
    into = leaf.grad_into
    if into is not None and (leaf.grad is None or leaf.grad is into):
        if leaf.grad is None:
            into[...] = g      # straight into the flat gradient buffer: one copy, no allocation
        else:
            into += g          # the buffer is ours, so accumulating in place is safe
        leaf.grad = into
    elif leaf.grad is not None:
        leaf.grad = leaf.grad + g   # a fresh array: the old one may be shared with the caller
    else:
        shared = g.base is not None or id(g) in given
        leaf.grad = g.copy() if shared else g
        given.add(id(leaf.grad))


def _topological_order(root):
    """Every tensor reachable from `root` that needs a gradient, each after all of its parents.

    Iterative depth-first search: a 10,000-op chain is far deeper than Python's
    default recursion limit (1000).
    """
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if isinstance(p, (Tensor, _Node)) and p.requires_grad)
    return order


class _Node:
    """The graph record of a computed tensor: its Function, the saved context and its inputs' records.

    Why a separate record instead of links on the Tensor itself (as micrograd's Value has): the
    graph must outlive the Python variables that named the intermediate results, but not keep
    their arrays. A Tensor owns its array and points at its _Node; the _Node points at its
    inputs' _Nodes (a leaf input as the Tensor itself, whose .grad backward fills). So once the
    forward pass drops a variable, its activation array is freed unless a saved context still
    needs it, as PyTorch's grad_fn graph does; backward walks _Nodes only.
    """

    __slots__ = ("_fn", "_ctx", "_parents", "requires_grad")

    def __init__(self, fn, ctx, parents):
        self._fn, self._ctx, self._parents, self.requires_grad = fn, ctx, parents, True


class Context:
    """What a Function's forward leaves for its backward."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad  # one bool per input
        self.saved = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays


class Function:
    """One differentiable op. Subclasses define static forward(ctx, *arrays, **params) and
    backward(ctx, grad) -> one gradient (or None) per input; both see raw arrays, never Tensors."""

    @classmethod
    def apply(cls, *inputs, **params):
        """Run forward on the inputs' arrays and, when a gradient is needed, record the graph.

        Inputs may be Tensors, arrays or Python numbers; numbers stay Python scalars so that
        they never promote a float32 tensor.
        """
        arrays = []
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
            elif isinstance(x, (int, float)) or backend.is_array(x):
                arrays.append(x)
            else:
                arrays.append(_as_array(x))
        _check_same_backend(cls, arrays)
        needs = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        record = _grad_enabled and any(needs)
        ctx = Context(needs)
        out = Tensor.__new__(Tensor)
        out.data = cls.forward(ctx, *arrays, **params)
        out.grad, out.requires_grad = None, record
        out._node = None
        if record:
            parents = tuple(x._node if isinstance(x, Tensor) and x._node is not None else x for x in inputs)
            out._node = _Node(cls, ctx, parents)
        return out


def _check_same_backend(fn, arrays):
    """Raise a clear error when an op mixes numpy and cupy arrays (instead of cupy's TypeError)."""
    if backend.cupy is None:
        return
    kinds = {type(a).__module__.split(".")[0] for a in arrays if backend.is_array(a)}
    if len(kinds) > 1:
        raise TypeError(f"{fn.__name__} got arrays from different backends ({', '.join(sorted(kinds))}); "
                        "move them to one with minidiff.use_backend(...) before creating tensors")


def check_state_keys(owner, state, expected, scalars=(), strict=True):
    """Check a state dict before anything is copied from it: one ValueError naming every missing key,
    unexpected key and shape mismatch. `expected` maps array keys to their shapes, `scalars` names
    keys of any shape; strict=False tolerates missing and unexpected keys, never a wrong shape.
    (nn.Module, optim.Adam and optim.EMA load through it.)"""
    known = set(expected) | set(scalars)
    missing = [k for k in list(scalars) + list(expected) if k not in state]
    unexpected = [k for k in state if k not in known]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if strict and missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{owner}.load_state_dict: " + " | ".join(problems))
