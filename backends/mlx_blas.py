"""MLX on Linux CPU at BLAS speed. The Linux `mlx[cpu]` wheel links a bundled reference (netlib)
BLAS, ~30x slower than OpenBLAS for float32 matmuls (reference/backends.md §1). `ensure()`
finds that out from `libmlx.so`'s ELF dynamic section (no import of mlx.core) and, if so,
loads an optimised BLAS with global symbol scope, so that the dynamic linker binds MLX's
`cblas_sgemm` to it when mlx.core is loaded. It must run before `import mlx.core`:
`moe_min.backends.ops_mlx` calls it first. `blas_status()` says what happened, for
`moe-min info`. May import: stdlib only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import mmap
import os
import platform
import re
import struct
import subprocess
import sys
import sysconfig
import warnings

ENV = "MOE_MIN_BLAS"
INSTALL_HINT = ("install an optimised BLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`;"
                " without root: `pip install 'moe-min[blas]'`, the mkl wheel)"
                f" or point {ENV}=/path/to/libopenblas.so at one")
_REFERENCE = re.compile(r"^lib(c?blas|refblas)([-.]|$)")  # netlib names (auditwheel adds -hash)
_OPTIMISED = re.compile(r"openblas|mkl|blis|armpl|flexiblas", re.I)
_state: dict = {"ran": False, "loaded": "", "handle": None, "when": "", "note": "", "warned": set()}


def _warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def mlx_library() -> str | None:
    """Path of MLX's libmlx.so, found without importing mlx.core (None: MLX not installed)."""
    spec = importlib.util.find_spec("mlx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "lib", "libmlx.so")
        if os.path.isfile(path):
            return path
    return None


def read_elf(path: str, symbols: tuple[str, ...] = ()) -> dict:
    """DT_NEEDED, RPATH/RUNPATH and the relocation offsets (GOT slots) of `symbols` from a
    64-bit little-endian ELF's dynamic section; file offsets come from the PT_LOAD segments,
    because patchelf'd wheels (auditwheel) have vaddr != offset."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
            raise ValueError(f"{path}: not a 64-bit little-endian ELF")
        (phoff,) = struct.unpack_from("<Q", m, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", m, 0x36)
        loads, dynamic = [], None
        for i in range(phnum):
            kind, _, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", m,
                                                                     phoff + i * phentsize)
            if kind == 1:  # PT_LOAD
                loads.append((vaddr, off, filesz))
            elif kind == 2:  # PT_DYNAMIC
                dynamic = (off, filesz)
        if dynamic is None:
            raise ValueError(f"{path}: no dynamic section")

        def at(vaddr):
            for start, off, size in loads:
                if start <= vaddr < start + size:
                    return off + vaddr - start
            raise ValueError(f"{path}: address {vaddr:#x} is in no loaded segment")

        tags: dict[int, list[int]] = {}
        for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, value = struct.unpack_from("<qQ", m, pos)
            if tag == 0:  # DT_NULL
                break
            tags.setdefault(tag, []).append(value)
        strtab = at(tags[5][0])

        def string(offset):
            return m[strtab + offset:m.find(b"\0", strtab + offset)].decode()

        slots = {}
        if symbols and 6 in tags:  # DT_SYMTAB; relocations: DT_JMPREL/DT_PLTRELSZ, DT_RELA/SZ
            symtab = at(tags[6][0])
            for table, size in ((23, 2), (7, 8)):
                if table in tags and size in tags:
                    base = at(tags[table][0])
                    for pos in range(base, base + tags[size][0], 24):
                        offset, info, _ = struct.unpack_from("<QQq", m, pos)
                        (name,) = struct.unpack_from("<I", m, symtab + (info >> 32) * 24)
                        if info >> 32 and string(name) in symbols:
                            slots.setdefault(string(name), offset)
        return {"needed": [string(v) for v in tags.get(1, [])], "slots": slots,
                "search": [string(v) for t in (15, 29) for v in tags.get(t, [])]}


def mlx_blas_link(lib: str) -> dict:
    """Which BLAS libmlx.so links: {"name", "path", "reference", "how"}; ELF first, ldd after."""
    try:
        elf, how = read_elf(lib), "ELF DT_NEEDED"
        found = {}
        for name in elf["needed"]:
            for folder in ":".join(elf["search"]).split(":"):
                path = os.path.join(folder.replace("$ORIGIN", os.path.dirname(lib)), name)
                if folder and os.path.isfile(path):
                    found[name] = os.path.realpath(path)
                    break
    except (OSError, ValueError, KeyError, struct.error):
        out = subprocess.run(["ldd", lib], capture_output=True, text=True, check=False).stdout
        found = {k: os.path.realpath(v) for k, v in re.findall(r"^\s*(\S+) => (/\S+)", out, re.M)}
        how = "ldd"
    for name, path in found.items():
        if _REFERENCE.match(name) or _OPTIMISED.search(name):
            reference = bool(_REFERENCE.match(name)) and not _OPTIMISED.search(
                os.path.realpath(path))  # Debian's libblas.so.3 may be an alternative to openblas
            return {"name": name, "path": path, "reference": reference, "how": how}
    return {"name": "", "path": "", "reference": False, "how": how}


def candidates() -> list[str]:
    """Optimised BLAS libraries to try, best first; $MOE_MIN_BLAS alone when it is set."""
    if os.environ.get(ENV):
        return [os.environ[ENV]]
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    paths = [f"/usr/lib/{arch}/{variant}libopenblas.so.0"  # Debian libopenblas0-pthread first
             for variant in ("openblas-pthread/", "", "openblas-openmp/")]
    found = ctypes.util.find_library("openblas")
    # the `mkl` wheel (extra `blas`): pip-only, no root; its libmkl_rt exports cblas_sgemm
    wheel = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return [p for p in paths if os.path.exists(p)] + ([found] if found else []) + wheel[:1]


def why(path: str) -> str:
    """Why `path` was the BLAS chosen, for `moe-min info`."""
    if os.environ.get(ENV):
        return f"named by ${ENV}"
    if "mkl" in os.path.basename(path):
        return "no system OpenBLAS found; the mkl wheel (pip install 'moe-min[blas]')"
    return "the system OpenBLAS (Debian: libopenblas0-pthread), preferred when present"


def ensure() -> dict:
    """Load an optimised BLAS globally if MLX links the reference one. Idempotent; never raises."""
    if _state["ran"] or not sys.platform.startswith("linux"):
        return blas_status()
    _state["ran"] = True
    lib = mlx_library()
    if lib is None:
        return blas_status()
    link = mlx_blas_link(lib)
    if not link["reference"]:
        return blas_status()
    if "mlx.core" in sys.modules:  # libmlx's cblas_sgemm is bound already: too late to swap
        if not _OPTIMISED.search(_global_provider("cblas_sgemm")):
            _state["note"] = "mlx.core was imported first: MLX keeps its reference BLAS"
            preload = (candidates() or ["<libopenblas.so.0>"])[0]
            _warn_once("late", f"mlx.core was imported before moe_min.backends.ops_mlx, so MLX "
                               f"keeps its bundled reference BLAS (~30x slower matmuls) in this "
                               f"process: import moe_min.backends.ops_mlx first, or start "
                               f"Python with LD_PRELOAD={preload}")
        return blas_status()
    errors = []
    for path in candidates():
        try:
            handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            handle.cblas_sgemm  # noqa: B018 - a library without the CBLAS interface cannot serve
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        _state.update(loaded=path, handle=handle, when="before mlx.core")
        return blas_status()
    _state["note"] = "no optimised BLAS found" + "".join(f"; {e}" for e in errors)
    _warn_once("none", f"MLX on Linux links a reference BLAS (~30x slower matmuls) and "
                       f"{_state['note']}: {INSTALL_HINT}")
    return blas_status()


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _libc():
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    libc.dlopen.restype, libc.dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    libc.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    libc.dlclose.argtypes = [ctypes.c_void_p]
    return libc


def _file_of(address: int | None) -> str:
    info = _DlInfo()
    if not address or not _libc().dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return ""
    return os.path.realpath(info.dli_fname.decode())


def _global_provider(symbol: str) -> str:
    """The file that provides `symbol` in the process's global scope (dlsym(RTLD_DEFAULT))."""
    try:
        return _file_of(ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value)
    except (AttributeError, OSError):
        return ""


def mlx_sgemm_provider(lib: str | None = None) -> str:
    """The file MLX's own `cblas_sgemm` call lands in: libmlx.so's GOT slot for the symbol, read
    from memory and resolved with dladdr. "" if libmlx is not loaded; libmlx itself while the
    lazy PLT slot is still unbound (no float32 matmul has run yet)."""
    lib = lib or mlx_library()
    if not lib or not sys.platform.startswith("linux"):
        return ""
    slot = read_elf(lib, ("cblas_sgemm",))["slots"].get("cblas_sgemm")
    libc = _libc()
    handle = libc.dlopen(lib.encode(), os.RTLD_NOLOAD | os.RTLD_LAZY)
    if slot is None or not handle:
        return ""
    try:
        link_map = ctypes.c_void_p()
        libc.dlinfo(handle, 2, ctypes.byref(link_map))  # RTLD_DI_LINKMAP; l_addr comes first
        base = ctypes.c_size_t.from_address(link_map.value).value
        return _file_of(ctypes.c_void_p.from_address(base + slot).value)
    finally:
        libc.dlclose(handle)


def _openblas_info(handle) -> str:
    try:
        handle.openblas_get_config.restype = ctypes.c_char_p
        handle.openblas_get_corename.restype = ctypes.c_char_p
        config, core = handle.openblas_get_config(), handle.openblas_get_corename()
        threads = handle.openblas_get_num_threads()
        return f"{config.decode()} (core {core.decode()}, {threads} threads)"
    except (AttributeError, OSError):
        return ""


def blas_status(resolve: bool = True) -> dict[str, str]:
    """What MLX's matmuls run on. resolve: if mlx.core is loaded, run one tiny float32 matmul so
    the lazy `cblas_sgemm` slot is bound, then report where it points."""
    status = {"platform": sys.platform, "mlx_library": "", "mlx_links": "", "loaded": "",
              "in_use": "n/a", "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}
    if not sys.platform.startswith("linux"):
        status["note"] = "MLX uses Accelerate on macOS; nothing to do"
        return status
    lib = mlx_library()
    if lib is None:
        return {**status, "note": "MLX is not installed"}
    link = mlx_blas_link(lib)
    status.update(mlx_library=lib, mlx_links=f"{link['path'] or link['name'] or '?'} "
                  f"({'reference' if link['reference'] else 'optimised'}, via {link['how']})",
                  loaded=f"{_state['loaded']} ({_state['when']})" if _state["loaded"] else "")
    if _state["handle"] is not None:
        status["why"] = why(_state["loaded"])
        if "openblas" in _state["loaded"]:
            status["openblas"] = _openblas_info(_state["handle"])
    if _state["note"]:
        status["note"] = _state["note"]
    if "mlx.core" in sys.modules:
        if resolve:
            mx = sys.modules["mlx.core"]
            mx.eval(mx.matmul(mx.ones((2, 2)), mx.ones((2, 2)), stream=mx.cpu))
        provider = mlx_sgemm_provider(lib)
        status["mlx_cblas_sgemm"] = provider or "unknown"
        status["in_use"] = ("unknown" if not provider or provider == os.path.realpath(lib) else
                            "yes" if _OPTIMISED.search(provider) else "no")
    return status
