"""The implementations the benchmark compares: attnfast, NumPy, and the optional peers.

Each implementation is detected at run time, never at import time, so attnfast and its tests work without
any peer installed.  Every implementation gets its inputs in its own native layout, prepared outside
the timed region (a user of that library would hold their tensors that way), and returns its output
converted back to (B, H, Lq, D) only for the error check.

| name          | what is timed                                                      | layout       |
|---------------|--------------------------------------------------------------------|--------------|
| attnfast      | ``attnfast.attention`` / ``scores`` / ``softmax`` / ``aggregate``  | (B, H, L, D) |
| numpy         | ``np.matmul``, ``np.exp`` in the benchmark dtype (the unfused way)   | (B, H, L, D) |
| torch         | ``torch.nn.functional.scaled_dot_product_attention`` (CPU)        | (B, H, L, D) |
| onnxruntime   | ``com.microsoft`` ``MultiHeadAttention`` through I/O binding       | q (B, L, H·D), k/v (B, H, L, D) |
| jax           | ``jax.jit(jax.nn.dot_product_attention)`` on CPU                   | (B, L, H, D) |

All of them are pinned to the same thread count (:func:`pin_threads`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .cases import AttentionCase, StageCase

__all__ = ["Impl", "all_impls", "PEER_NAMES", "INSTALL_HINTS", "pin_threads", "numpy_attention"]

#: Implementations that count as "peers" for the "speed-up over the best peer" column.
PEER_NAMES = ("torch", "onnxruntime", "jax")

INSTALL_HINTS = {
    "attnfast": "pip install .  (from the attnfast checkout; needs a C++17 compiler and CMake)",
    "torch": "pip install torch==2.13.0  (pin it: an unpinned torch pulls several GB of CUDA packages; "
             "or use --index-url https://download.pytorch.org/whl/cpu)",
    "onnxruntime": "pip install onnxruntime onnx",
    "jax": "pip install jax",
}

Runner = Callable[[], object]
ToBHLD = Callable[[object], np.ndarray]


class Impl:
    """One implementation: availability, thread pinning, and runners for attention and the stages."""

    name = "?"
    label = "?"
    #: Label in the stage tables, where a library's plain matmul/softmax runs rather than its attention op.
    stage_label: Optional[str] = None
    #: Whether it materialises the (B, H, Lq, Lk) score matrix (used to skip cases that cannot fit).
    quadratic_memory = False
    stages = False
    #: Whether the first call does one-time work (compilation, arenas) that a memory probe must skip.
    first_call_allocates = False

    def __init__(self):
        self._error: Optional[str] = None
        self._checked = False

    # -- availability ---------------------------------------------------------------------------
    def _import(self) -> None:
        """Import the library; raise ImportError (or anything) when unusable."""

    def available(self) -> bool:
        if not self._checked:
            self._checked = True
            try:
                self._import()
            except Exception as exc:  # noqa: BLE001 - an optional peer may fail in many ways
                self._error = f"{type(exc).__name__}: {exc}"
        return self._error is None

    @property
    def error(self) -> Optional[str]:
        return self._error

    def version(self) -> Optional[str]:
        return None

    def set_threads(self, n: int) -> None:
        """Pin this library's intra-op thread pool to ``n`` threads."""

    def threads(self) -> Optional[int]:
        return None

    # -- cases ----------------------------------------------------------------------------------
    def skip_reason(self, case, dtype: np.dtype, causal: bool) -> Optional[str]:
        """Why this implementation cannot run ``case`` (None when it can)."""
        if isinstance(case, StageCase) and not self.stages:
            return "stage not benchmarked for this library"
        return None

    def label_for(self, case) -> str:
        return self.stage_label if isinstance(case, StageCase) and self.stage_label else self.label

    def prepare(self, case, inputs: tuple, causal: bool) -> Tuple[Runner, ToBHLD]:
        """A zero-argument callable that runs the case, and a function mapping its result to NumPy."""
        if isinstance(case, AttentionCase):
            return self.prepare_attention(case, *inputs, causal=causal)
        return self.prepare_stage(case, inputs)

    def prepare_attention(self, case, q, k, v, causal) -> Tuple[Runner, ToBHLD]:
        raise NotImplementedError

    def prepare_stage(self, case, inputs) -> Tuple[Runner, ToBHLD]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
class AttnfastImpl(Impl):
    name = "attnfast"
    label = "attnfast"
    stages = True

    def _import(self):
        import attnfast

        missing = [f for f in ("attention", "scores", "softmax", "aggregate") if not hasattr(attnfast, f)]
        if missing:
            raise ImportError(f"attnfast has no {', '.join(missing)} (is the compiled module built?)")
        self._mod = attnfast

    def version(self):
        return getattr(self._mod, "__version__", None)

    def set_threads(self, n):
        if hasattr(self._mod, "set_num_threads"):
            self._mod.set_num_threads(n)

    def threads(self):
        return self._mod.get_num_threads() if hasattr(self._mod, "get_num_threads") else None

    def prepare_attention(self, case, q, k, v, causal):
        af = self._mod
        if causal:
            return (lambda: af.attention(q, k, v, causal=True)), np.asarray
        return (lambda: af.attention(q, k, v)), np.asarray

    def prepare_stage(self, case, inputs):
        af = self._mod
        if case.stage == "scores":
            q, k = inputs
            return (lambda: af.scores(q, k, method="dot")), np.asarray
        if case.stage == "softmax":
            (x,) = inputs
            return (lambda: af.softmax(x, axis=-1)), np.asarray
        w, v = inputs
        return (lambda: af.aggregate(w, v)), np.asarray


# ----------------------------------------------------------------------------------------------------
def numpy_attention(q, k, v, causal=False):
    """Unfused attention in the inputs' dtype the way a NumPy user writes it, with in-place temporaries.

    Builds the full (..., Lq, Lk) score matrix; causal is top-left aligned (key j visible when j <= i).
    """
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    if causal:
        lq, lk = s.shape[-2:]
        hidden = np.arange(lk)[None, :] > np.arange(lq)[:, None]
        s[..., hidden] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def numpy_softmax(x):
    e = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


class NumpyImpl(Impl):
    name = "numpy"
    label = "NumPy"
    quadratic_memory = True
    stages = True

    def __init__(self):
        super().__init__()
        self._limiter = None

    def version(self):
        return np.__version__

    def set_threads(self, n):
        # NumPy itself is single-threaded; its BLAS (matmul) is not.
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        if self._limiter is not None:
            self._limiter.restore_original_limits()
        self._limiter = threadpool_limits(limits=n, user_api="blas")

    def threads(self):
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            return None
        counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        return max(counts) if counts else None

    def prepare_attention(self, case, q, k, v, causal):
        return (lambda: numpy_attention(q, k, v, causal)), np.asarray

    def prepare_stage(self, case, inputs):
        if case.stage == "scores":
            q, k = inputs
            return (lambda: np.matmul(q, np.swapaxes(k, -1, -2))), np.asarray
        if case.stage == "softmax":
            (x,) = inputs
            return (lambda: numpy_softmax(x)), np.asarray
        w, v = inputs
        return (lambda: np.matmul(w, v)), np.asarray


# ----------------------------------------------------------------------------------------------------
class TorchImpl(Impl):
    name = "torch"
    label = "PyTorch SDPA"
    stage_label = "PyTorch"
    stages = True

    def _import(self):
        import torch
        import torch.nn.functional  # noqa: F401

        self._torch = torch

    def version(self):
        return self._torch.__version__

    def set_threads(self, n):
        self._torch.set_num_threads(n)

    def threads(self):
        return self._torch.get_num_threads()

    def prepare_attention(self, case, q, k, v, causal):
        torch = self._torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))  # zero-copy views of the NumPy buffers

        def run():
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=causal)

        return run, lambda t: t.numpy()

    def prepare_stage(self, case, inputs):
        torch = self._torch
        ts = [torch.from_numpy(a) for a in inputs]
        if case.stage == "scores":
            q, k = ts
            fn = lambda: torch.matmul(q, k.transpose(-1, -2))  # noqa: E731
        elif case.stage == "softmax":
            (x,) = ts
            fn = lambda: torch.softmax(x, dim=-1)  # noqa: E731
        else:
            w, v = ts
            fn = lambda: torch.matmul(w, v)  # noqa: E731

        def run():
            with torch.inference_mode():
                return fn()

        return run, lambda t: t.numpy()


# ----------------------------------------------------------------------------------------------------
class OnnxRuntimeImpl(Impl):
    name = "onnxruntime"
    label = "ONNX Runtime MHA"
    quadratic_memory = True
    first_call_allocates = True

    def __init__(self):
        super().__init__()
        self._threads = None
        self.arena = True  # the memory probe turns the arena off so freed memory shows as freed

    def _import(self):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self._ort, self._helper, self._tp = ort, helper, TensorProto

    def version(self):
        return self._ort.__version__

    def set_threads(self, n):
        self._threads = n  # applied to every session created from now on

    def threads(self):
        return self._threads

    def skip_reason(self, case, dtype, causal):
        if isinstance(case, StageCase):
            return super().skip_reason(case, dtype, causal)
        if np.dtype(dtype) != np.float32:
            return "MultiHeadAttention has no float64 CPU kernel"
        if causal and case.Lq != case.Lk:
            return "unidirectional masking is aligned differently when Lq != Lk"
        return None

    def _session(self, heads: int, causal: bool):
        helper, tp, ort = self._helper, self._tp, self._ort
        attrs = {"num_heads": heads}
        if causal:
            attrs["unidirectional"] = 1
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", **attrs)
        io = [helper.make_tensor_value_info(n, tp.FLOAT, None) for n in ("q", "k", "v", "o")]
        graph = helper.make_graph([node], "mha", io[:3], io[3:])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        if self._threads:
            so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        # ORT's idle pool threads spin-wait by default; in an interleaved benchmark they would keep both
        # cores busy while the next library runs (measured: PyTorch 2x slower right after an ORT call).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_cpu_mem_arena = self.arena
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def prepare_attention(self, case, q, k, v, causal):
        ort = self._ort
        B, H, Lq, _, D = case.shape
        sess = self._session(H, causal)
        # Query must be (B, Lq, H·D); key and value may stay (B, H, Lk, D) ("BNSH"), saving two copies.
        q_bsd = np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(B, Lq, H * D))
        binding = sess.io_binding()
        keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in (q_bsd, k, v)]  # keep the buffers alive
        for name, value in zip(("q", "k", "v"), keep):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("o")

        def run():
            sess.run_with_iobinding(binding)
            return binding

        def to_bhld(b):
            out = b.copy_outputs_to_cpu()[0]
            return out.reshape(B, Lq, H, -1).transpose(0, 2, 1, 3)

        run.keep = keep  # tie the input buffers' lifetime to the runner
        return run, to_bhld


# ----------------------------------------------------------------------------------------------------
class JaxImpl(Impl):
    name = "jax"
    label = "JAX"
    quadratic_memory = True
    first_call_allocates = True

    def __init__(self, threads: Optional[int] = None):
        super().__init__()
        self._threads = threads

    def _import(self):
        # XLA reads its flags once, at import: the thread count must be set before.
        if self._threads == 1 and "jax" not in _loaded_modules():
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false"
                                       " intra_op_parallelism_threads=1").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp

        if not hasattr(jax.nn, "dot_product_attention"):
            raise ImportError(f"jax {jax.__version__} has no jax.nn.dot_product_attention (needs >= 0.4.31)")
        self._jax, self._jnp = jax, jnp

    def version(self):
        return self._jax.__version__

    def set_threads(self, n):
        self._threads = n

    def threads(self):
        # XLA:CPU sizes its pool to the cores unless limited to one thread at import.
        from .machine import usable_cores
        return 1 if self._threads == 1 else usable_cores()

    def prepare_attention(self, case, q, k, v, causal):
        jax = self._jax
        if q.dtype == np.float64:
            jax.config.update("jax_enable_x64", True)
        fn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=causal))
        # jax.nn.dot_product_attention wants (B, L, H, D).
        args = [jax.device_put(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v)]

        def run():
            return fn(*args).block_until_ready()

        return run, lambda out: np.asarray(out).transpose(0, 2, 1, 3)


def _loaded_modules():
    import sys
    return sys.modules


def all_impls(threads: Optional[int] = None) -> List[Impl]:
    """Every implementation the benchmark knows, attnfast first and NumPy second."""
    return [AttnfastImpl(), NumpyImpl(), TorchImpl(), OnnxRuntimeImpl(), JaxImpl(threads)]


def pin_threads(impls, n: int) -> Dict[str, Optional[int]]:
    """Pin every available implementation (and every OpenMP/BLAS pool in the process) to ``n`` threads.

    Returns the thread count each implementation reports afterwards, for the report.
    """
    try:
        from threadpoolctl import threadpool_limits
        # Process-wide: BLAS used by NumPy and OpenMP runtimes (attnfast's, torch's) alike.
        threadpool_limits(limits=n)
    except ImportError:
        pass
    counts = {}
    for impl in impls:
        if impl.available():
            impl.set_threads(n)
            counts[impl.name] = impl.threads()
    return counts
