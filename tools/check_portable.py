"""Check that x86 intrinsics stay in the x86 targets, so the scalar build compiles on any CPU.

The x86-only files (each SIMD target's translation unit, its vector and bfloat16/AMX tile headers) may
use intrinsics freely: only x86 targets include them. Every other C++ file is shared with the scalar
target and may use an intrinsic header, an x86 vector type (``__m256``...), an ``_mm*_``/``_tile_``
intrinsic or an ``__builtin_ia32``/``__builtin_cpu_supports`` builtin only inside a preprocessor block
whose condition names an x86 feature macro (``#if defined(__AVX__)``, ``__x86_64__``...), and not in
that block's ``#else``. The aarch64 compile in CI (tools/cross_aarch64.sh) proves those guards hold;
this check also covers files that build does not include (tests, new headers).

Usage: python tools/check_portable.py  (exit status 1 and one line per offending use otherwise)
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Compiled only into x86 targets (CMakeLists.txt adds them only on x86-64; the headers are included only
# by those targets' translation units or under their ATTNFAST_TARGET_* guards).
X86_ONLY = {
    "cpp/src/target_avx2.cpp",
    "cpp/src/target_avx512.cpp",
    "cpp/src/target_avx512bf16.cpp",
    "cpp/src/target_amx.cpp",
    "cpp/src/simd/vec_avx2.h",
    "cpp/src/simd/vec_avx512.h",
    "cpp/src/simd/half_f16c.h",
    "cpp/src/kernels/attention_tiles_bf16.h",
    "cpp/src/kernels/attention_tiles_amx.h",
    "cpp/src/kernels/amx_tiles.h",
    "cpp/src/kernels/amx_model.h",
    "cpp/tests/amx_tiles_test.cpp",
}

X86_USE = re.compile(
    r"#\s*include\s*<(?:\w*intrin|cpuid)\.h>"
    r"|\b__m(?:64|128|256|512)\w*"
    r"|\b_mm(?:256|512)?_\w+"
    r"|\b_tile_\w+"
    r"|\b__builtin_ia32_\w+"
    r"|\b__builtin_cpu_(?:supports|is|init)\b"
)
X86_MACRO = re.compile(
    r"\b(?:__x86_64__|__i386__|_M_X64|_M_IX86|__AVX\w*__|__SSE\w*__|__F16C__|__FMA__|__AMX\w*__"
    r"|ATTNFAST_TARGET_(?:AVX2|AVX512|AVX512BF16|AMX))\b"
)
CONDITIONAL = re.compile(r"^\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)")


def offending_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    """Lines of ``path`` that use an x86 intrinsic outside an x86-guarded preprocessor block."""
    found = []
    # One entry per open #if: whether the branch being read is x86-only. `#ifndef __AVX__` and an
    # #else of an x86 condition are the non-x86 branch: not x86-only.
    stack: list[bool] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cond = CONDITIONAL.match(line)
        if cond:
            kind, rest = cond.groups()
            if kind in ("if", "ifdef"):
                negated = kind == "if" and re.match(r"\s*!", rest) is not None
                stack.append(bool(X86_MACRO.search(rest)) and not negated)
            elif kind == "ifndef":
                stack.append(False)
            elif kind == "elif" and stack:
                stack[-1] = bool(X86_MACRO.search(rest))
            elif kind == "else" and stack:
                stack[-1] = False
            elif kind == "endif" and stack:
                stack.pop()
            continue
        code = line.split("//", 1)[0]
        if X86_USE.search(code) and not any(stack):
            found.append((number, line.strip()))
    return found


def main() -> int:
    sources = sorted(
        p for p in (ROOT / "cpp").rglob("*") if p.suffix in (".h", ".hpp", ".cpp", ".cc")
    )
    bad = 0
    for path in sources:
        rel = path.relative_to(ROOT).as_posix()
        if rel in X86_ONLY:
            continue
        for number, text in offending_lines(path):
            print(f"{rel}:{number}: x86 intrinsic outside an x86 guard: {text}")
            bad += 1
    if bad:
        print(f"{bad} use(s): guard them with #if defined(__AVX__) (or the target's macro) or move "
              "them into an x86 target's file (tools/check_portable.py lists those)")
        return 1
    print(f"check_portable: {len(sources)} C++ files, x86 intrinsics only in x86 targets or guards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
