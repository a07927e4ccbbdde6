"""Exact compact weights: a float32 matrix kept in the narrowest form that holds its values bit for bit.

Many float32 checkpoints carry fewer bits than float32 can: a model converted from a GGUF file holds
4-bit blocks (Q4_1: 16 levels per block of 32 weights, each `code * step + min` with float16 step and
min; Q4_0: `step * (code - 8)`, the same form) or 8-bit ones (Q8_0: `code * step`), and most published checkpoints
are bfloat16 values. One token
reads every weight once, so on a CPU the bytes per weight set the speed: a node that finds its float32
matrices are exactly such values keeps them so (`ExactWeight.of`, checked bit for bit through the kernel's
own reconstruction) and multiplies with small C kernels (common/weights/kernels/exact.c) that rebuild each
weight in float32 as the dense matrix holds it and sum in float32. Results equal the dense products up
to float rounding (the order of the sums), as every product here does; no weight changes.

The kernels are compiled once per machine with the system's C compiler into ~/.cache/potluck/kernels
(about a second); where there is none, or it fails, `shared_kernels()` says why and nodes keep the dense
float32 matrices."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.weights.fast_linear import frozen_linear
from common.weights.threads import one_torch_thread, saved_threads

log = logging.getLogger(__name__)

BLOCK = 32
FORMATS = ("q4", "q8", "bf16")  # narrowest first: the first one that holds a matrix exactly is kept
PROBE_ROWS = 16  # rows tried in a format before the whole matrix is
KERNEL_ROWS = 32  # products of up to this many rows run the kernels; longer ones (prefills) a dense product
KERNELS = Path(__file__).with_name("kernels")
# fast.c: `--numerics fast` (llama.cpp's numerics); decode.c: a lean span's decode pass (node/model/lean_decode.py)
SOURCES = (KERNELS / "exact.c", KERNELS / "fast.c", KERNELS / "decode.c")
NUMERICS = ("exact", "fast")
FAST_FORMATS = ("q4", "q8")  # the forms kernels/fast.c multiplies
DEFAULT_CACHE = Path("~/.cache/potluck/kernels").expanduser()
COMPILERS = ("cc", "gcc", "clang")
FLAG_SETS = (  # tried in order: the first that builds is kept
    ("-O3", "-march=native", "-pthread"),
    ("-O3", "-pthread"),
)
ABI = 3

_p, _i = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "q4_gemm": [_p, _i, _i, _p, _p, _p, _i, _p, _i],
    "q8_gemm": [_p, _i, _i, _p, _p, _i, _p, _i],
    "bf_gemm": [_p, _i, _i, _p, _i, _p, _i],
    "q4_dense": [_p, _p, _p, _i, _i, _i, _p],
    "q8_dense": [_p, _p, _i, _i, _i, _p],
    "exact_hot": [_i],
    "q4_fast_gemm": [_p, _i, _i, _p, _p, _p, _i, _p, _i],
    "q8_fast_gemm": [_p, _i, _i, _p, _p, _i, _p, _i],
}
_RETURNS_INT = ("q4_fast_gemm", "q8_fast_gemm")  # 0, or -1 where memory for the activations' codes is short


class KernelError(RuntimeError):
    """The exact kernels cannot be built or loaded here (no C compiler, a failed build, a foreign library)."""


@dataclass(frozen=True)
class Kernels:
    """The compiled library; each call releases the GIL (ctypes) while it computes."""

    lib: ctypes.CDLL
    path: Path
    width: int  # the products' vector width in bits: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (portable C)

    @property
    def simd(self) -> bool:
        return self.width > 0

    @property
    def instructions(self) -> str:
        return {512: "AVX-512", 256: "AVX2 + FMA"}.get(self.width, "portable C")

    def __post_init__(self) -> None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(self.lib, name)
            function.argtypes, function.restype = argtypes, (_i if name in _RETURNS_INT else None)

    @contextlib.contextmanager
    def hot(self):
        """A pass of up to KERNEL_ROWS rows (a node's decode steps) runs in this. The kernels' helper threads spin
        between its products instead of sleeping, so each product starts on every thread at once; they sleep
        again after it (kernels/exact.c). Products keep torch's thread count, torch's own operations run on
        this thread alone meanwhile (common/weights/threads.py)."""
        with one_torch_thread():
            self.lib.exact_hot(1)
            try:
                yield
            finally:
                self.lib.exact_hot(0)


def _machine_key(compiler: str) -> str:
    """What a built library depends on: the source, the compiler, and this CPU (-march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    sources = tuple(source.read_text() for source in SOURCES)
    text = "|".join((*sources, compiler, platform.machine(), platform.system(), flags))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_kernels(cache: Path = DEFAULT_CACHE, compilers: tuple[str, ...] = COMPILERS) -> Kernels:
    """Compile (once per machine: the library is cached by source, compiler and CPU) and load the kernels."""
    compiler = next((path for path in map(shutil.which, compilers) if path), None)
    if compiler is None:
        raise KernelError(f"no C compiler found (looked for {', '.join(compilers)})")
    target = cache / f"exact-{_machine_key(compiler)}.so"
    if not target.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KernelError(f"cannot write the kernel cache {cache}: {error}") from error
        errors = []
        for flags in FLAG_SETS:
            handle, temporary = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(handle)
            try:
                done = subprocess.run([compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", temporary],
                                      capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                done = None
                errors.append(f"{' '.join(flags)}: {error}")
            if done is not None and done.returncode == 0:
                os.replace(temporary, target)  # atomic: nodes starting together may build side by side
                break
            if done is not None:
                errors.append(f"{' '.join(flags)}: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.unlink(temporary)
        else:
            raise KernelError(f"{compiler} could not build {', '.join(s.name for s in SOURCES)}: " + "; ".join(errors))
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        raise KernelError(f"cannot load {target}: {error}") from error
    if lib.exact_abi() != ABI:
        raise KernelError(f"{target} is not this version's kernel library")
    return Kernels(lib, target, lib.exact_simd())


@functools.lru_cache(maxsize=1)
def shared_kernels() -> Kernels | None:
    """The process's kernels (built on first use); None, with the reason logged once, where they cannot be."""
    try:
        return build_kernels()
    except KernelError as error:
        log.warning("exact compact weights are off: %s", error)
        return None


# -- weights ----------------------------------------------------------------------------------------
def _round_half(values: torch.Tensor) -> list[torch.Tensor]:
    """float32 candidates for a float16 step near `values`: the nearest float16 and its two neighbours."""
    half = values.to(torch.float16)
    bits = half.view(torch.int16)
    return [half.float(), (bits + 1).view(torch.float16).float(), (bits - 1).view(torch.float16).float()]


def _codes(blocks: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Codes, steps (and minimums for q4) that rebuild every block of `blocks` [n, 32] exactly; None if none do."""
    if fmt == "q4":
        low, high = blocks.aminmax(dim=1)
        base, top, code_range = low, high - low, 15
    else:
        base, top, code_range = None, blocks.abs().amax(dim=1), 127
    steps = torch.zeros_like(top)
    codes = torch.zeros(blocks.shape, dtype=torch.float32)
    pending = torch.ones(blocks.shape[0], dtype=torch.bool)
    # the block's largest code is code_range when its extremes are the grid's ends (Q4_1, Q8_0); a Q4_0 block
    # (d * (code - 8)) is sure to hold only one end, so for q4 fewer levels are tried too
    spans = range(code_range, 7, -1) if fmt == "q4" else (code_range,)
    for step in (candidate for levels in spans for candidate in _round_half(top / levels)):
        rows = pending.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        part, candidate = blocks[rows], step[rows]
        shifted = part - base[rows, None] if base is not None else part
        safe = torch.where(candidate > 0, candidate, torch.ones_like(candidate))
        code = torch.round(shifted / safe[:, None]).clamp_(0 if base is not None else -code_range, code_range)
        code = torch.where(candidate[:, None] > 0, code, torch.zeros_like(code))
        rebuilt = code * candidate[:, None] + (base[rows, None] if base is not None else 0)
        good = (rebuilt == part).all(dim=1) & torch.isfinite(candidate)
        steps[rows[good]], codes[rows[good]] = candidate[good], code[good]
        pending[rows[good]] = False
    if bool(pending.any()):
        return None
    return codes, steps, base


class ExactWeight:
    """W [out, in] (float32, CPU) held as q4 / q8 / bf16 codes; `linear(x, bias)` is x @ W.T + bias in float32."""

    def __init__(self, fmt: str, shape: tuple[int, int], codes: torch.Tensor, steps: torch.Tensor | None,
                 mins: torch.Tensor | None, kernels: Kernels):
        self.format, (self.out_features, self.in_features) = fmt, shape
        self.codes, self.steps, self.mins, self.kernels = codes, steps, mins, kernels
        self.row_threads: int | None = None  # threads for one-row products (None: torch's); see `calibrate_threads`
        # "fast": products in llama.cpp's numerics (kernels/fast.c: activations quantised to 8-bit blocks, integer
        # dot products), for q4 and q8 forms, at every row count; set by `use_numerics`. "exact": as documented above
        self.numerics = "exact"

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @classmethod
    def of(cls, weight: torch.Tensor, kernels: Kernels, formats: tuple[str, ...] = FORMATS) -> "ExactWeight | None":
        """`weight` [out, in] in the first of `formats` that holds it bit for bit (checked through the kernels'
        own reconstruction); None when none does (or it is not a float32 CPU matrix with rows of whole blocks)."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] % BLOCK:
            return None
        weight = weight.detach().contiguous()
        for fmt in formats:
            if cls._encode(fmt, weight[:PROBE_ROWS], kernels) is None:  # most matrices fail on their first rows
                continue
            exact = cls._encode(fmt, weight, kernels)
            if exact is not None and torch.equal(exact.dense(), weight):
                return exact
        return None

    @classmethod
    def _encode(cls, fmt: str, weight: torch.Tensor, kernels: Kernels) -> "ExactWeight | None":
        if fmt == "bf16":
            narrow = weight.to(torch.bfloat16)
            return cls(fmt, tuple(weight.shape), narrow.view(torch.int16), None, None, kernels) \
                if torch.equal(narrow.float(), weight) else None
        found = _codes(weight.reshape(-1, BLOCK), fmt)
        if found is None:
            return None
        codes, steps, mins = found
        out, inp = weight.shape
        if fmt == "q8":
            return cls(fmt, (out, inp), codes.to(torch.int8).reshape(out, inp), steps.reshape(out, -1), None, kernels)
        nibbles = codes.to(torch.uint8).reshape(-1, 2, BLOCK // 2)  # weight j in the low nibble, j + 16 in the high
        packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).reshape(out, inp // 2)
        return cls(fmt, (out, inp), packed, steps.reshape(out, -1), mins.reshape(out, -1), kernels)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.steps, self.mins) if t is not None]

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of W as a dense float32 matrix: the same bits as the matrix this was made of."""
        stop = self.out_features if stop is None else stop
        if self.format == "bf16":
            return self.codes[start:stop].view(torch.bfloat16).float()
        out = torch.empty(stop - start, self.in_features, dtype=torch.float32)
        lib = self.kernels.lib
        if self.format == "q4":
            lib.q4_dense(self.codes.data_ptr(), self.steps.data_ptr(), self.mins.data_ptr(), self.in_features, start,
                         stop, out.data_ptr())
        else:
            lib.q8_dense(self.codes.data_ptr(), self.steps.data_ptr(), self.in_features, start, stop, out.data_ptr())
        return out

    def product(self, x: torch.Tensor, bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
        """x [..., in] @ W.T + bias in float32 (no gradient)."""
        out = self._product(x, threads)
        return out + bias if bias is not None else out

    @property
    def fast(self) -> bool:
        """Whether products run in llama.cpp's numerics (`use_numerics`)."""
        return self.numerics == "fast"

    def _product(self, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if self.fast:
            return self._fast_product(flat, threads).reshape(*x.shape[:-1], self.out_features)
        if rows > KERNEL_ROWS:
            return (flat @ self.dense().t()).reshape(*x.shape[:-1], self.out_features)
        flat = flat.to(torch.float32).contiguous()
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        threads = self._threads(rows, threads)
        lib, args = self.kernels.lib, (flat.data_ptr(), rows, self.in_features)
        if self.format == "q4":
            lib.q4_gemm(*args, self.codes.data_ptr(), self.steps.data_ptr(), self.mins.data_ptr(), self.out_features,
                        out.data_ptr(), threads)
        elif self.format == "q8":
            lib.q8_gemm(*args, self.codes.data_ptr(), self.steps.data_ptr(), self.out_features, out.data_ptr(), threads)
        else:
            lib.bf_gemm(*args, self.codes.data_ptr(), self.out_features, out.data_ptr(), threads)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _threads(self, rows: int, threads: int | None) -> int:
        """Threads a `rows`-row product runs on: as asked, else one-row products' calibrated count, else a
        pass's saved count, else torch's."""
        return threads or (rows == 1 and self.row_threads) or saved_threads() or torch.get_num_threads()

    def _fast_product(self, flat: torch.Tensor, threads: int | None) -> torch.Tensor:
        """flat [rows, in] @ W.T in llama.cpp's numerics (kernels/fast.c), for any number of rows: a prefill is
        computed as its decode steps would be."""
        rows = flat.shape[0]
        flat = flat.to(torch.float32).contiguous()
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        threads = self._threads(rows, threads)
        lib, args = self.kernels.lib, (flat.data_ptr(), rows, self.in_features)
        if self.format == "q4":
            failed = lib.q4_fast_gemm(*args, self.codes.data_ptr(), self.steps.data_ptr(), self.mins.data_ptr(),
                                      self.out_features, out.data_ptr(), threads)
        else:
            failed = lib.q8_fast_gemm(*args, self.codes.data_ptr(), self.steps.data_ptr(), self.out_features,
                                      out.data_ptr(), threads)
        if failed:
            raise MemoryError(f"no memory for the 8-bit codes of a {rows}-row product's activations")
        return out

    def use_numerics(self, numerics: str) -> bool:
        """Products from now on in `numerics` ("exact" | "fast"); whether this weight takes it (the fast numerics
        have q4 and q8 forms only: a bf16 weight stays exact)."""
        if numerics not in NUMERICS:
            raise ValueError(f"numerics {numerics!r} is not one of {', '.join(NUMERICS)}")
        if numerics == "fast" and self.format not in FAST_FORMATS:
            return False
        self.numerics = numerics
        return True

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return frozen_linear(self, x, bias)

    def matrix(self) -> torch.Tensor:
        """W [out, in] (for gradients)."""
        return self.dense()


class ExactParts:
    """A fused matrix (q/k/v, gate/up) whose projections need different forms: each part held as its own exact
    weight (or dense [in, out] where none holds it), the outputs side by side. A GGUF file may store a layer's
    value projection in Q8_0 beside Q4_0 queries and keys."""

    def __init__(self, parts: list["ExactWeight | torch.Tensor"]):
        self.parts = parts
        self.in_features = _part_shape(parts[0])[1]
        self.out_features = sum(_part_shape(part)[0] for part in parts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in (part.tensors() if isinstance(part, ExactWeight) else [part])]

    def exact(self) -> list[ExactWeight]:
        return [part for part in self.parts if isinstance(part, ExactWeight)]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.cat([part.linear(x) if isinstance(part, ExactWeight) else x @ part for part in self.parts], dim=-1)
        return out + bias if bias is not None else out


def _part_shape(part) -> tuple[int, int]:
    """[out, in] of an exact weight or of a dense part held as [in, out]."""
    return part.shape if isinstance(part, ExactWeight) else (part.shape[1], part.shape[0])


class ExactLinear(torch.nn.Module):
    """Drop-in for nn.Linear (or fast_linear.TransposedLinear) in transformers' own layers (families without a
    lean runtime), with an exact narrow weight."""

    def __init__(self, weight: ExactWeight, bias: torch.Tensor | None):
        super().__init__()
        self.exact = weight
        self.out_features, self.in_features = weight.shape
        self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix, rebuilt (bit for bit) for code that reads it; products never need it."""
        return self.exact.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.exact.format}"


def calibrate_threads(weights: list[ExactWeight], rounds: int = 7) -> int:
    """Time one-row products over `weights` with one thread and with torch's count, in alternating rounds, as a
    pass runs them (`Kernels.hot`), and set the faster on each (returned). On a busy machine a second thread may
    not pay for the hand-off on products this small."""
    candidates = sorted({1, torch.get_num_threads()})
    if not weights or len(candidates) == 1:
        return candidates[0]
    inputs = [torch.randn(1, weight.in_features) for weight in weights]
    times: dict[int, list[float]] = {threads: [] for threads in candidates}
    for round_ in range(rounds + 1):
        for threads in candidates:
            with weights[0].kernels.hot():
                start = time.perf_counter()
                for weight, x in zip(weights, inputs):
                    weight.product(x, threads=threads)
                if round_:  # the first round warms up
                    times[threads].append(time.perf_counter() - start)
    best = min(candidates, key=lambda threads: statistics.median(times[threads]))
    for weight in weights:
        weight.row_threads = best
    return best


def pass_threads(kernels: Kernels | None, rows: int) -> contextlib.AbstractContextManager:
    """What a pass of `rows` rows runs in, over a span whose exact weights use `kernels` (`span_kernels`):
    `Kernels.hot` where the kernels take the pass's products (up to KERNEL_ROWS rows); nothing otherwise."""
    return kernels.hot() if kernels is not None and rows <= KERNEL_ROWS else contextlib.nullcontext()


