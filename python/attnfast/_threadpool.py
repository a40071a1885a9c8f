"""attnfast's thread pool as a threadpoolctl library.

attnfast runs its kernels on its own task pool, not on an OpenMP runtime, so threadpoolctl would not see
it by itself. This module registers a threadpoolctl controller for it (``user_api`` and ``internal_api``
``"attnfast"``), so that::

    threadpoolctl.threadpool_info()                     # lists attnfast: version, num_threads, filepath
    threadpoolctl.threadpool_limits(1)                  # limits attnfast along with BLAS and OpenMP
    threadpoolctl.threadpool_limits(1, user_api="attnfast")

What the limit does: it is one process-wide cap (``set_thread_limit`` in cpp/src/threads.cpp), so inside
``with threadpool_limits(1):`` calls from every Python thread use one thread. It is separate from
``attnfast.set_num_threads``, the user's own choice, which it never changes; the count a call uses is the
smallest of the default, that choice and the limit (a limit above the count has no effect). The
controller reaches the limit through C functions the extension module exports (``attnfast_threadpool_*``)
on the module file threadpoolctl found, so it controls exactly that file's pool.

Exact restore: threadpoolctl restores a library by passing back the ``num_threads`` it read before it
set a limit. A plain count cannot say whether that value was a limit or just the default (``2`` with no
limit behaves differently from a limit of 2 once ``set_num_threads(4)`` is called on a bigger machine),
so ``num_threads`` is a ``ThreadCount``: an ``int`` that also remembers the limit in force when it was
read, which ``set_num_threads`` restores as it was, "no limit" included. It compares, hashes, prints and
serialises as the plain count it is.

Registration costs ``import attnfast`` nothing measurable: when threadpoolctl is already imported the
controller is registered at once; otherwise an import hook (a ``sys.meta_path`` finder that looks only at
the name ``threadpoolctl`` and removes itself after its one use) registers it right after threadpoolctl
is imported, so attnfast never imports threadpoolctl itself, and works without it.
"""

from __future__ import annotations

import ctypes
import operator
import sys
import weakref

_USER_API = "attnfast"
_PREFIX = "_attnfast"  # the extension module's file name: _attnfast.cpython-311-x86_64-linux-gnu.so, ...
_SYMBOLS = (
    "attnfast_threadpool_num_threads",
    "attnfast_threadpool_get_limit",
    "attnfast_threadpool_set_limit",
    "attnfast_threadpool_version",
)


class ThreadCount(int):
    """A thread count as threadpoolctl reads it from attnfast: the count, and the limit it was read under.

    ``limit`` is threadpoolctl's limit at that moment (0: none). Passing this value back to the
    controller's ``set_num_threads`` (as threadpoolctl does to restore) restores that limit exactly.
    """

    limit: int

    def __new__(cls, threads: int, limit: int) -> "ThreadCount":
        count = super().__new__(cls, threads)
        count.limit = limit
        return count

    def __reduce__(self):
        # A copy or another process gets the plain count: the limit belongs to this process' pool.
        return (int, (int(self),))


def _functions(dynlib):
    """The module's C entry points with their signatures (ctypes' default is int(void))."""
    dynlib.attnfast_threadpool_num_threads.restype = ctypes.c_int
    dynlib.attnfast_threadpool_num_threads.argtypes = ()
    dynlib.attnfast_threadpool_get_limit.restype = ctypes.c_int
    dynlib.attnfast_threadpool_get_limit.argtypes = ()
    dynlib.attnfast_threadpool_set_limit.restype = None
    dynlib.attnfast_threadpool_set_limit.argtypes = (ctypes.c_int,)
    dynlib.attnfast_threadpool_version.restype = ctypes.c_char_p
    dynlib.attnfast_threadpool_version.argtypes = ()
    return dynlib


def _controller_class(threadpoolctl):
    """The LibController subclass for this threadpoolctl module (defined here: it needs the base class)."""

    class AttnfastController(threadpoolctl.LibController):
        """attnfast's task pool: a process-wide limit, restored exactly (see attnfast._threadpool)."""

        user_api = _USER_API
        internal_api = _USER_API
        filename_prefixes = (_PREFIX,)
        check_symbols = _SYMBOLS

        def get_num_threads(self):
            lib = _functions(self.dynlib)
            return ThreadCount(lib.attnfast_threadpool_num_threads(), lib.attnfast_threadpool_get_limit())

        def set_num_threads(self, num_threads):
            lib = _functions(self.dynlib)
            if isinstance(num_threads, ThreadCount):
                lib.attnfast_threadpool_set_limit(num_threads.limit)
                return
            try:
                if isinstance(num_threads, bool):
                    raise TypeError
                n = operator.index(num_threads)
            except TypeError:
                raise TypeError(
                    f"threadpoolctl's limit for attnfast must be an int, got {type(num_threads).__name__}"
                ) from None
            if n < 1:
                raise ValueError(
                    f"threadpoolctl's limit for attnfast must be at least 1 thread, got {n}; "
                    "call attnfast.set_num_threads(0) to restore attnfast's default count"
                )
            lib.attnfast_threadpool_set_limit(min(n, 65536))

        def get_version(self):
            # threadpoolctl calls this before it checks check_symbols: a file that merely shares the
            # prefix must not raise here (it is then dropped for lacking the symbols).
            if not all(hasattr(self.dynlib, name) for name in _SYMBOLS):
                return None
            version = _functions(self.dynlib).attnfast_threadpool_version()
            return version.decode() if version else None

    return AttnfastController


_registered = weakref.WeakSet()  # the threadpoolctl modules attnfast's controller is registered with


def register(threadpoolctl) -> None:
    """Registers attnfast's controller with this threadpoolctl module, once; never raises.

    threadpoolctl older than 3.0 has no custom controllers: attnfast is then simply not listed.
    """
    if threadpoolctl in _registered:
        return
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return
    try:
        threadpoolctl.register(_controller_class(threadpoolctl))
    except Exception:  # an incompatible future threadpoolctl must not break its own import or attnfast's
        return
    _registered.add(threadpoolctl)


class _RegisteringLoader:
    """Wraps threadpoolctl's loader for one import: runs it, then registers, then steps aside."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # The module should look as if imported normally.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        if sys.modules.get("threadpoolctl") is module:  # an import, not a module made from a found spec
            _remove_finder()
        register(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """A sys.meta_path entry that answers only for threadpoolctl, with the real spec and a wrapped loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "threadpoolctl":
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def _remove_finder() -> None:
    try:
        sys.meta_path.remove(_FINDER)
    except ValueError:
        pass


def install() -> None:
    """Called when attnfast is imported: registers now, or when threadpoolctl gets imported."""
    for name in ("threadpoolctl", "__main__"):
        module = sys.modules.get(name)
        # __main__ when run as `python -m threadpoolctl -i attnfast`
        spec = getattr(module, "__spec__", None)
        if module is not None and (name == "threadpoolctl" or getattr(spec, "name", None) == "threadpoolctl"):
            register(module)
    if "threadpoolctl" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
