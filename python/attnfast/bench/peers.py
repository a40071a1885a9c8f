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

16-bit runs (``--dtype bfloat16`` / ``float16``) hand every library the 16-bit arrays themselves: PyTorch
gets zero-copy tensors of the same buffers, ONNX Runtime and JAX their FLOAT16/BFLOAT16 types.  NumPy has
no fast 16-bit matmul (float16 runs a naive loop at ~1 GFLOP/s), so its rows convert to float32, compute,
and round the result, as a NumPy user would; that row says so.  A library that cannot run a dtype shows
"n/a" with its reason.  ``attnfast-float32`` is attnfast on the same values converted to float32 (outside
the timed region): the baseline of the "× af f32" column, measured in the same rounds.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from .cases import HALF_DTYPES, AttentionCase, StageCase, storage_dtype

__all__ = ["Impl", "all_impls", "PEER_NAMES", "BASELINE_NAME", "INSTALL_HINTS", "pin_threads",
           "numpy_attention", "select", "error_summary"]

#: Implementations that count as "peers" for the "speed-up over the best peer" column.
PEER_NAMES = ("torch", "onnxruntime", "jax")

#: attnfast in float32 on the same shape, the baseline of 16-bit runs.
BASELINE_NAME = "attnfast-float32"

INSTALL_HINTS = {
    "attnfast": "pip install .  (from the attnfast checkout; needs a C++17 compiler and CMake)",
    "torch": "pip install torch==2.13.0  (pin it: an unpinned torch pulls several GB of CUDA packages; "
             "or use --index-url https://download.pytorch.org/whl/cpu)",
    "onnxruntime": "pip install onnxruntime onnx",
    "jax": "pip install jax",
}


def error_summary(exc: BaseException) -> str:
    """``"TypeError: <first line of the message>"``: libraries' messages can run over many lines."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _is_half(dtype: Any) -> bool:
    return (dtype if isinstance(dtype, str) else np.dtype(dtype).name) in HALF_DTYPES


Runner = Callable[[], object]
Case = Union[AttentionCase, StageCase]
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
    #: Whether it frees a finished call's buffers on a thread of its own (a memory probe waits first).
    frees_asynchronously = False
    #: Whether attention takes a query whose dtype differs from K's and V's (float32 q, 16-bit K/V).
    #: Those that do not get q converted to K's dtype before timing, and the row says so.
    mixed_query = False
    #: The implementation whose availability and ``--impl`` name this one shares (the float32 baseline
    #: comes with attnfast).
    family: Optional[str] = None

    def __init__(self) -> None:
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
    def dtype_unsupported(self, dtype: np.dtype) -> Optional[str]:
        """Why this implementation cannot compute in ``dtype`` at all (None when it can), shown as "n/a".

        Libraries that raise TypeError for a dtype need not say so here: the runner reports that too.
        """
        return None

    def runs(self, case: Case) -> bool:
        """Whether the benchmark has a runner of this implementation for the kind of ``case``."""
        return self.stages or not isinstance(case, StageCase)

    def skip_reason(self, case: Case, dtype: np.dtype, causal: bool) -> Optional[str]:
        """Why this implementation cannot run ``case`` (None when it can)."""
        if not self.runs(case):
            return "stage not benchmarked for this library"
        return self.dtype_unsupported(dtype)

    def label_for(self, case: Any, dtype: Any = None) -> str:
        return self.stage_label if isinstance(case, StageCase) and self.stage_label else self.label

    def input_note(self, case: Case, inputs: Tuple[Any, ...]) -> Optional[str]:
        """What :meth:`prepare` changes about the inputs before timing (shown under the table)."""
        if self._converts_query(case, inputs):
            return (f"q converted to {inputs[1].dtype.name} before timing "
                    f"(needs one dtype for q, k and v)")
        return None

    def _converts_query(self, case: Case, inputs: Tuple[Any, ...]) -> bool:
        return (isinstance(case, AttentionCase) and not self.mixed_query
                and inputs[0].dtype != inputs[1].dtype)

    def prepare(self, case: Case, inputs: Tuple[Any, ...], causal: bool) -> Tuple[Runner, ToBHLD]:
        """A zero-argument callable that runs the case, and a function mapping its result to NumPy."""
        if isinstance(case, AttentionCase):
            q, k, v = inputs
            if self._converts_query(case, inputs):
                q = q.astype(k.dtype)
            return self.prepare_attention(case, q, k, v, causal=causal)
        return self.prepare_stage(case, inputs)

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        raise NotImplementedError

    def prepare_stage(self, case: StageCase, inputs: Tuple[Any, ...]) -> Tuple[Runner, ToBHLD]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
class AttnfastImpl(Impl):
    name = "attnfast"
    label = "attnfast"
    stages = True
    mixed_query = True

    def _import(self) -> None:
        import attnfast

        missing = [f for f in ("attention", "scores", "softmax", "aggregate") if not hasattr(attnfast, f)]
        if missing:
            raise ImportError(f"attnfast has no {', '.join(missing)} (is the compiled module built?)")
        self._mod: Any = attnfast

    def version(self) -> Optional[str]:
        return getattr(self._mod, "__version__", None)

    def set_threads(self, n: int) -> None:
        if hasattr(self._mod, "set_num_threads"):
            self._mod.set_num_threads(n)

    def threads(self) -> Optional[int]:
        return self._mod.get_num_threads() if hasattr(self._mod, "get_num_threads") else None

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        af = self._mod
        if causal:
            return (lambda: af.attention(q, k, v, causal=True)), np.asarray
        return (lambda: af.attention(q, k, v)), np.asarray

    def prepare_stage(self, case: StageCase, inputs: Tuple[Any, ...]) -> Tuple[Runner, ToBHLD]:
        af = self._mod
        if case.stage == "scores":
            q, k = inputs
            return (lambda: af.scores(q, k, method="dot")), np.asarray
        if case.stage == "softmax":
            (x,) = inputs
            return (lambda: af.softmax(x, axis=-1)), np.asarray
        w, v = inputs
        return (lambda: af.aggregate(w, v)), np.asarray


class AttnfastFloat32Impl(AttnfastImpl):
    """attnfast on the case's values converted to float32: the same-run baseline of 16-bit runs."""

    name = BASELINE_NAME
    label = "attnfast float32"
    family = "attnfast"

    def label_for(self, case: Any, dtype: Any = None) -> str:
        return "attnfast float32 (baseline)"

    def input_note(self, case: Case, inputs: Tuple[Any, ...]) -> Optional[str]:
        return None

    def prepare(self, case: Case, inputs: Tuple[Any, ...], causal: bool) -> Tuple[Runner, ToBHLD]:
        # Converted outside the timed region: the values are the 16-bit ones, exactly.
        return super().prepare(case, tuple(a.astype(np.float32) for a in inputs), causal)


# ----------------------------------------------------------------------------------------------------
def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False) -> np.ndarray:
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
    out: np.ndarray = np.matmul(s, v)
    return out


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e: np.ndarray = x - x.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _in_float32(fn: Callable[..., np.ndarray], result_dtype: Any) -> Callable[..., np.ndarray]:
    """``fn`` on float32 copies of its arguments, the result rounded to ``result_dtype``: NumPy's only
    fast way with 16-bit arrays (its float16 matmul is a naive loop)."""
    def run(*arrays: np.ndarray) -> np.ndarray:
        return fn(*(a.astype(np.float32) for a in arrays)).astype(result_dtype)
    return run


class NumpyImpl(Impl):
    name = "numpy"
    label = "NumPy"
    quadratic_memory = True
    stages = True
    mixed_query = True  # NumPy promotes

    def __init__(self) -> None:
        super().__init__()
        self._limiter: Any = None

    def version(self) -> Optional[str]:
        return np.__version__

    def label_for(self, case: Any, dtype: Any = None) -> str:
        if dtype is not None and _is_half(dtype):
            return "NumPy (float32 math)"
        return super().label_for(case, dtype)

    def input_note(self, case: Case, inputs: Tuple[Any, ...]) -> Optional[str]:
        if not any(_is_half(a.dtype) for a in inputs):
            return None
        result = np.result_type(*inputs)
        if _is_half(result):
            return (f"converts the 16-bit inputs to float32 and rounds the result to {result.name}, "
                    "in the timed call")
        return "converts the 16-bit inputs to float32, in the timed call"

    def set_threads(self, n: int) -> None:
        # NumPy itself is single-threaded; its BLAS (matmul) is not.
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        if self._limiter is not None:
            self._limiter.restore_original_limits()
        self._limiter = threadpool_limits(limits=n, user_api="blas")

    def threads(self) -> Optional[int]:
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            return None
        counts: List[int] = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        return max(counts) if counts else None

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        if _is_half(k.dtype):
            fn = _in_float32(lambda a, b, c: numpy_attention(a, b, c, causal), np.result_type(q, k, v))
            return (lambda: fn(q, k, v)), np.asarray
        return (lambda: numpy_attention(q, k, v, causal)), np.asarray

    def prepare_stage(self, case: StageCase, inputs: Tuple[Any, ...]) -> Tuple[Runner, ToBHLD]:
        fn: Callable[..., np.ndarray]
        if case.stage == "scores":
            fn = lambda q, k: np.matmul(q, np.swapaxes(k, -1, -2))  # noqa: E731
        elif case.stage == "softmax":
            fn = numpy_softmax
        else:
            fn = np.matmul
        if _is_half(inputs[0].dtype):
            fn = _in_float32(fn, np.result_type(*inputs))
        return (lambda: fn(*inputs)), np.asarray


# ----------------------------------------------------------------------------------------------------
class TorchImpl(Impl):
    name = "torch"
    label = "PyTorch SDPA"
    stage_label = "PyTorch"
    stages = True

    def _import(self) -> None:
        import torch
        import torch.nn.functional  # noqa: F401

        self._torch: Any = torch

    def version(self) -> Optional[str]:
        return str(self._torch.__version__)

    def set_threads(self, n: int) -> None:
        self._torch.set_num_threads(n)

    def threads(self) -> Optional[int]:
        return int(self._torch.get_num_threads())

    def _tensor(self, a: np.ndarray) -> Any:
        """A zero-copy tensor of ``a``'s buffer; bfloat16 through an int16 view (NumPy has no bfloat16)."""
        if a.dtype.name == "bfloat16":
            return self._torch.from_numpy(a.view(np.int16)).view(self._torch.bfloat16)
        return self._torch.from_numpy(a)

    def _to_numpy(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16:
            import ml_dtypes
            array: np.ndarray = t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
            return array
        array = t.numpy()
        return array

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        torch = self._torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv = (self._tensor(a) for a in (q, k, v))  # zero-copy views of the NumPy buffers

        def run() -> object:
            with torch.inference_mode():
                return sdpa(tq, tk, tv, is_causal=causal)

        return run, self._to_numpy

    def prepare_stage(self, case: StageCase, inputs: Tuple[Any, ...]) -> Tuple[Runner, ToBHLD]:
        torch = self._torch
        ts = [self._tensor(a) for a in inputs]
        fn: Callable[[], object]
        if case.stage == "scores":
            q, k = ts
            fn = lambda: torch.matmul(q, k.transpose(-1, -2))  # noqa: E731
        elif case.stage == "softmax":
            (x,) = ts
            fn = lambda: torch.softmax(x, dim=-1)  # noqa: E731
        else:
            w, v = ts
            fn = lambda: torch.matmul(w, v)  # noqa: E731

        def run() -> object:
            with torch.inference_mode():
                return fn()

        return run, self._to_numpy


# ----------------------------------------------------------------------------------------------------
class OnnxRuntimeImpl(Impl):
    name = "onnxruntime"
    label = "ONNX Runtime MHA"
    quadratic_memory = True
    first_call_allocates = True

    def __init__(self) -> None:
        super().__init__()
        self._threads: Optional[int] = None
        self.arena = True  # the memory probe turns the arena off so freed memory shows as freed
        self._dtype_support: Dict[str, Optional[str]] = {}

    def _import(self) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self._ort: Any = ort
        self._helper: Any = helper
        self._tp: Any = TensorProto

    def version(self) -> Optional[str]:
        return str(self._ort.__version__)

    def set_threads(self, n: int) -> None:
        self._threads = n  # applied to every session created from now on

    def threads(self) -> Optional[int]:
        return self._threads

    def skip_reason(self, case: Case, dtype: np.dtype, causal: bool) -> Optional[str]:
        reason = super().skip_reason(case, dtype, causal)
        if reason:
            return reason
        if causal and isinstance(case, AttentionCase) and case.Lq != case.Lk:
            return "unidirectional masking is aligned differently when Lq != Lk"
        return None

    def dtype_unsupported(self, dtype: Any) -> Optional[str]:
        """Why the CPU provider cannot run MultiHeadAttention in this dtype (None when it can).

        Asked of the installed ONNX Runtime once per dtype (a session on a tiny input): its CPU kernels
        have changed between releases (1.32: float32 and float16, no float64 or bfloat16).
        """
        dtype_name = np.dtype(dtype).name
        if dtype_name not in self._dtype_support:
            reason = None
            try:
                sess = self._session(1, False, dtype_name)
                x = np.zeros((1, 1, 8), dtype=storage_dtype(dtype_name))
                sess.run(None, {"q": x, "k": x, "v": x})
            except Exception as exc:  # noqa: BLE001 - whatever ORT raises means "no kernel for this dtype"
                # Its messages read "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : <what>": keep the what.
                what = error_summary(exc).rsplit(" : ", 1)[-1]
                reason = (f"onnxruntime {self._ort.__version__} has no CPU MultiHeadAttention kernel for "
                          f"{dtype_name}: {what}")
            self._dtype_support[dtype_name] = reason
        return self._dtype_support[dtype_name]

    def _session(self, heads: int, causal: bool, dtype_name: str = "float32") -> Any:
        helper, tp, ort = self._helper, self._tp, self._ort
        attrs: Dict[str, int] = {"num_heads": heads}
        if causal:
            attrs["unidirectional"] = 1
        elem = {"float32": tp.FLOAT, "float64": tp.DOUBLE, "float16": tp.FLOAT16,
                "bfloat16": tp.BFLOAT16}[dtype_name]
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", **attrs)
        io = [helper.make_tensor_value_info(n, elem, None) for n in ("q", "k", "v", "o")]
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

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        ort = self._ort
        B, H, Lq, _, D = case.shape
        sess = self._session(H, causal, k.dtype.name)
        # Query must be (B, Lq, H·D); key and value may stay (B, H, Lk, D) ("BNSH"), saving two copies.
        q_bsd = np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(B, Lq, H * D))
        binding = sess.io_binding()
        keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in (q_bsd, k, v)]  # keep the buffers alive
        for name, value in zip(("q", "k", "v"), keep):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("o")

        def run() -> object:
            sess.run_with_iobinding(binding)
            return binding

        def to_bhld(b: Any) -> np.ndarray:
            out = b.copy_outputs_to_cpu()[0]
            bhld: np.ndarray = out.reshape(B, Lq, H, -1).transpose(0, 2, 1, 3)
            return bhld

        run.keep = keep  # type: ignore[attr-defined]  # tie the input buffers' lifetime to the runner
        return run, to_bhld


# ----------------------------------------------------------------------------------------------------
class JaxImpl(Impl):
    name = "jax"
    label = "JAX"
    quadratic_memory = True
    # Compiled ahead of time in prepare_attention, so the first call is an ordinary one (its peak RSS
    # measured within 1% of a second call's on the default shapes) and the memory probe needs no
    # unmeasured call first.
    first_call_allocates = False
    frees_asynchronously = True

    def __init__(self, threads: Optional[int] = None):
        super().__init__()
        self._threads = threads
        self._dtype_support: Dict[str, Optional[str]] = {}

    def _import(self) -> None:
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
        self._jax: Any = jax
        self._jnp: Any = jnp

    def version(self) -> Optional[str]:
        return str(self._jax.__version__)

    def set_threads(self, n: int) -> None:
        self._threads = n

    def threads(self) -> Optional[int]:
        # XLA:CPU sizes its pool to the cores unless limited to one thread at import.
        from .machine import usable_cores
        return 1 if self._threads == 1 else usable_cores()

    def dtype_unsupported(self, dtype: Any) -> Optional[str]:
        """Why the jitted call fails in this 16-bit dtype on CPU (None when it runs), asked once.

        jax 0.10 compiles float16 to a float16 x float16 -> float32 dot that XLA:CPU rejects; bfloat16 runs.
        """
        dtype_name = np.dtype(dtype).name
        if not _is_half(dtype_name):
            return None
        if dtype_name not in self._dtype_support:
            reason = None
            try:
                x = self._jax.device_put(np.zeros((1, 2, 1, 8), dtype=storage_dtype(dtype_name)))
                fn = self._jax.jit(lambda a, b, c: self._jax.nn.dot_product_attention(a, b, c))
                fn(x, x, x).block_until_ready()
            except Exception as exc:  # noqa: BLE001 - any failure means this dtype cannot be measured
                reason = (f"jax {self._jax.__version__}: jit(dot_product_attention) fails in {dtype_name} "
                          f"on CPU ({error_summary(exc)})")
            self._dtype_support[dtype_name] = reason
        return self._dtype_support[dtype_name]

    def prepare_attention(self, case: AttentionCase, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                          causal: bool) -> Tuple[Runner, ToBHLD]:
        jax = self._jax
        if q.dtype == np.float64:
            jax.config.update("jax_enable_x64", True)
        # jax.nn.dot_product_attention wants (B, L, H, D).
        args = [jax.device_put(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v)]
        fn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=causal)
                     ).lower(*args).compile()

        def run() -> object:
            return fn(*args).block_until_ready()

        return run, lambda out: np.asarray(out).transpose(0, 2, 1, 3)


def _loaded_modules() -> Dict[str, Any]:
    import sys
    return sys.modules


def all_impls(threads: Optional[int] = None, dtype: Optional[str] = None) -> List[Impl]:
    """Every implementation the benchmark knows, attnfast first and NumPy second.

    For a 16-bit ``dtype`` the float32 baseline (:data:`BASELINE_NAME`) follows attnfast.
    """
    impls: List[Impl] = [AttnfastImpl()]
    if dtype is not None and _is_half(dtype):
        impls.append(AttnfastFloat32Impl())
    return impls + [NumpyImpl(), TorchImpl(), OnnxRuntimeImpl(), JaxImpl(threads)]


AnyImpl = TypeVar("AnyImpl", bound=Impl)


def select(impls: Sequence[AnyImpl], names: Optional[Sequence[str]]) -> List[AnyImpl]:
    """The implementations ``--impl`` names (all when ``names`` is None); a family brings its members."""
    if not names:
        return list(impls)
    return [i for i in impls if i.name in names or (i.family is not None and i.family in names)]


def pin_threads(impls: Sequence[Impl], n: int) -> Dict[str, Optional[int]]:
    """Pin every available implementation (and every OpenMP/BLAS pool in the process) to ``n`` threads.

    Returns the thread count each implementation reports afterwards, for the report.
    """
    try:
        from threadpoolctl import threadpool_limits
        # Process-wide: BLAS used by NumPy, OpenMP runtimes (torch's) and attnfast's own pool alike.
        threadpool_limits(limits=n)
    except ImportError:
        pass
    counts: Dict[str, Optional[int]] = {}
    for impl in impls:
        if impl.available():
            impl.set_threads(n)
            counts[impl.name] = impl.threads()
    return counts
