"""The kernels' thread pool: one op's batch chunks on every core of the CPU.

PyTorch's `at::parallel_for` idea, on numpy: an op splits its work into contiguous chunks
along the batch (or a flat buffer), and each chunk runs in its own thread. numpy releases
the GIL inside ufunc loops and BLAS calls, so the chunks really run at the same time.
BLAS itself is set to one thread (threadpoolctl) while the pool has more than one: two
single-threaded GEMMs on halves of the batch beat one narrow GEMM split by OpenBLAS, and
no BLAS thread spin-waits while numpy's elementwise passes run.

    parallel_for(n, fn)  # fn(start, stop) on contiguous chunks of range(n); chunk results, in order
    split(xp, n, chunk, threads, rows=..., sums=...)   # what kernels call: outputs and partial sums

With one thread (MINIDIFF_NUM_THREADS=1, or set_num_threads(1)) it is fn(0, n). Chunk
boundaries depend only on n and the thread count, so a run is reproducible at a fixed thread count; across thread counts, sums over chunks agree to
float32 reduction order. Chunks of a nested call, or of a call from a second Python
thread while the pool is busy, run serially in the calling thread.
May import: backend.
"""
import os
import queue
import threading

from .. import backend

_state = threading.local()  # .inside: this thread is running a chunk (nested calls run serially)
_lock = threading.Lock()    # one parallel region at a time; other callers run serially
_workers = []
_num_threads = None
_blas = None                # threadpoolctl's controller of the loaded BLAS, or False where unavailable
_blas_default = None        # the BLAS thread counts before the pool first limited them


def usable_cores():
    """CPUs this process may run on (its affinity mask where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _threads_from_env():
    value = os.environ.get("MINIDIFF_NUM_THREADS", "").strip()
    if not value:
        return usable_cores()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MINIDIFF_NUM_THREADS must be a positive integer; got {value!r} "
                         "(unset it to use every usable core)")
    return n


def _set_blas_threads(n):
    """Limit the BLAS that numpy loaded to n threads, or restore its own count for n=None
    (a no-op where threadpoolctl is missing)."""
    global _blas, _blas_default
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController().select(user_api="blas")
            _blas_default = [lib.num_threads for lib in _blas.lib_controllers]
        except Exception:  # ImportError, or a platform threadpoolctl cannot inspect
            _blas = False
    if not _blas:
        return
    for lib, default in zip(_blas.lib_controllers, _blas_default):
        lib.set_num_threads(default if n is None else n)  # stays until the next set_num_threads


def _worker(inbox, outbox):
    _state.inside = True
    while True:
        fn, start, stop = inbox.get()
        try:
            outbox.put((True, fn(start, stop)))
        except BaseException as exc:  # handed to the caller, which raises it
            outbox.put((False, exc))


def set_num_threads(n):
    """Use n threads for the heavy ops (n >= 1); with n > 1 BLAS runs single-threaded inside each chunk."""
    global _num_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads needs a positive thread count; got {n}")
    with _lock:
        while len(_workers) < n - 1:  # workers are daemons that wait for chunks; surplus ones just idle
            inbox, outbox = queue.SimpleQueue(), queue.SimpleQueue()
            threading.Thread(target=_worker, args=(inbox, outbox), daemon=True,
                             name=f"minidiff-{len(_workers) + 1}").start()
            _workers.append((inbox, outbox))
        _num_threads = n
    # one thread: BLAS as the environment set it (OPENBLAS_NUM_THREADS), the plain path
    _set_blas_threads(1 if n > 1 else None)


def get_num_threads():
    """The thread count parallel_for splits work over (MINIDIFF_NUM_THREADS, default: usable cores)."""
    if _num_threads is None:
        set_num_threads(_threads_from_env())
    return _num_threads


def chunks(n, parts):
    """Split range(n) into at most `parts` contiguous, nearly equal (start, stop) pairs, none empty."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


# Below these a second thread costs more than it saves: the GIL passes between the threads at every numpy
# call of their chunks, so a split op of many small calls pays more hand-offs than it gains. Chosen by
# measurement at 2 threads (BENCHMARKS.md, "Speed work, second round").
MIN_PARALLEL_SIZE = 1 << 18   # elements of elementwise work (the largest array, or `size`)
MIN_PARALLEL_MACS = 1 << 23   # multiply-adds of matrix products (`macs`)


def threads_for(*arrays, size=0, macs=0):
    """How many chunks to use on these arrays: 1 for GPU arrays (CuPy parallelises itself) and for small
    work, otherwise the pool's size. Small: the largest array (or `size` elements) under MIN_PARALLEL_SIZE
    and the op's matrix products (`macs` multiply-adds) under MIN_PARALLEL_MACS."""
    if any(backend.xp_of(a) is not backend.host for a in arrays):
        return 1
    if max(size, *(a.size for a in arrays)) < MIN_PARALLEL_SIZE and macs < MIN_PARALLEL_MACS:
        return 1
    return get_num_threads()


def part(arr, a, b):
    """arr[a:b], one chunk's rows; `arr` itself when the chunk is all of it (or None for None), so
    the one-chunk path (one thread, small arrays, a GPU) makes no view: on a GPU each is an op."""
    return arr if arr is None or (a == 0 and b == len(arr)) else arr[a:b]


def parallel_for(n, fn, threads=None):
    """[fn(start, stop) for each chunk of range(n)], the chunks run on the pool's threads at once.

    The caller's thread runs the first chunk; an exception in any chunk is raised here
    after every chunk has finished (no chunk is left writing into a shared output).
    """
    pool = get_num_threads()
    bounds = chunks(n, pool if threads is None else min(threads, len(_workers) + 1))
    if len(bounds) == 1 or getattr(_state, "inside", False) or not _lock.acquire(blocking=False):
        return [fn(a, b) for a, b in bounds]
    try:
        _state.inside = True
        for (inbox, _), (a, b) in zip(_workers, bounds[1:]):
            inbox.put((fn, a, b))
        results, error = [], None
        try:
            results.append(fn(*bounds[0]))
        except BaseException as exc:
            error = exc
        for _, outbox in _workers[:len(bounds) - 1]:
            ok, value = outbox.get()
            if ok:
                results.append(value)
            elif error is None:
                error = value
        if error is not None:
            raise error
        return results
    finally:
        _state.inside = False
        _lock.release()


def split(xp, n, chunk, threads, rows=(), sums=0):
    """The chunking idiom, stated once: run chunk(a, b, *views) on contiguous chunks [a, b) of range(n).

    Every kernel gives its per-chunk math as one plain function of (a, b) and the views of its
    outputs it may write into, and returns (*row_results, *partial_sums):
    - `rows`: one spec per output whose first axis follows the chunks, `(shape, dtype)` or an
      array to imitate (`empty_like`, which keeps its memory layout), or None (not computed).
      An output of shape[0] = k n gives chunk [a, b) the rows [k a, k b). With one chunk the
      views are None, so the chunk's own `out=None` ops allocate the result: the plain code
      path, no extra allocation. A row result that is not its view is copied into it.
    - `sums`: how many trailing results are partial sums over the chunk's items (a weight
      gradient, a bias gradient); they are added up in chunk order (None stays None).
    Returns the whole outputs followed by the sums: a tuple, or the single array when there is one.
    """
    get_num_threads()   # the pool (and BLAS's thread count) is set up before a kernel's first product
    if threads <= 1:
        results = chunk(0, n, *(None,) * len(rows))
    else:
        outs = [None if spec is None else (xp.empty_like(spec) if not isinstance(spec, tuple)
                                             else xp.empty(spec[0], dtype=spec[1])) for spec in rows]

        def run(a, b):
            views = [None if o is None else o[len(o) // n * a:len(o) // n * b] for o in outs]
            res = chunk(a, b, *views)
            res = res if isinstance(res, tuple) else (res,)
            for view, value in zip(views, res):
                if view is not None and value is not view:
                    view[...] = value
            return res[len(rows):]

        parts = parallel_for(n, run, threads)
        total = list(parts[0])
        for part_sums in parts[1:]:
            for i, value in enumerate(part_sums):
                if value is not None:
                    total[i] += value
        results = tuple(outs) + tuple(total)
    results = results if isinstance(results, tuple) else (results,)
    assert len(results) == len(rows) + sums, f"a chunk returned {len(results)} results, not {len(rows)} + {sums}"
    return results[0] if len(results) == 1 else results
