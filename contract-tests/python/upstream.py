"""Load the upstream ForwardPassMetrics modules straight out of their published wheels.

Nothing upstream is copied into this repository: `contract-tests/setup.sh` downloads the
pinned wheels (``pip download --no-deps``) and this module reads the single source file
each contract test needs out of the ``.whl`` zip at run time, compiles it and executes it
as a fresh module. Both upstream files import only the standard library and ``msgspec``
at import time, so the heavy dependency trees of ai-dynamo and sglang are never needed.

    import upstream
    dyn = upstream.load("dynamo")   # dynamo/common/forward_pass_metrics.py (ai-dynamo)
    sgl = upstream.load("sglang")   # sglang/srt/observability/forward_pass_metrics.py

Wheel lookup: ``$FPM_DYNAMO_WHEEL`` / ``$FPM_SGLANG_WHEEL`` (explicit file), else the single
matching wheel in ``$FPM_VENV/wheels`` (default ``<repo>/target/fpm-venv/wheels``).
"""

from __future__ import annotations

import glob
import linecache
import os
import sys
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> (wheel glob, member path inside the wheel, env var overriding the wheel path)
MODULES = {
    # "ai_dynamo-[0-9]*" so that an ai_dynamo_runtime wheel never matches.
    "dynamo": ("ai_dynamo-[0-9]*.whl", "dynamo/common/forward_pass_metrics.py", "FPM_DYNAMO_WHEEL"),
    "sglang": ("sglang-[0-9]*.whl", "sglang/srt/observability/forward_pass_metrics.py", "FPM_SGLANG_WHEEL"),
}


class UpstreamMissing(RuntimeError):
    """The upstream wheel (or the module inside it) could not be found."""


def wheels_dir() -> Path:
    venv = os.environ.get("FPM_VENV")
    base = Path(venv) if venv else REPO / "target" / "fpm-venv"
    return base / "wheels"


def wheel_path(name: str) -> Path:
    if name not in MODULES:
        raise ValueError(f"unknown upstream module {name!r}; expected one of {sorted(MODULES)}")
    pattern, _, env = MODULES[name]
    explicit = os.environ.get(env)
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UpstreamMissing(f"${env}={explicit} is not a file")
        return p
    d = wheels_dir()
    found = sorted(glob.glob(str(d / pattern)))
    if not found:
        raise UpstreamMissing(
            f"no wheel matching {pattern} in {d}; run contract-tests/setup.sh "
            f"(or set FPM_VENV / ${env})"
        )
    if len(found) > 1:
        names = ", ".join(Path(f).name for f in found)
        raise UpstreamMissing(
            f"several wheels match {pattern} in {d}: {names}; remove the stale ones "
            f"or set ${env} to the one to test against"
        )
    return Path(found[0])


def load(name: str) -> types.ModuleType:
    """Return the upstream forward_pass_metrics module ``name`` ("dynamo" or "sglang")."""
    modname = f"fpm_upstream_{name}"
    cached = sys.modules.get(modname)
    if cached is not None:
        return cached
    whl = wheel_path(name)
    member = MODULES[name][1]
    try:
        with zipfile.ZipFile(whl) as z:
            source = z.read(member).decode("utf-8")
    except KeyError:
        raise UpstreamMissing(f"{whl.name} has no {member}; did upstream move the module?") from None
    except zipfile.BadZipFile as e:
        raise UpstreamMissing(f"{whl} is not a valid wheel ({e}); rerun contract-tests/setup.sh") from None

    filename = f"{whl}/{member}"
    mod = types.ModuleType(modname)
    mod.__file__ = filename
    mod.__fpm_wheel__ = whl.name  # provenance, for reports
    mod.__fpm_member__ = member
    # Register before exec: the upstream files use `from __future__ import annotations`,
    # and msgspec resolves the string annotations through sys.modules[cls.__module__].
    sys.modules[modname] = mod
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        exec(compile(source, filename, "exec"), mod.__dict__)
    except BaseException:
        del sys.modules[modname]
        raise
    return mod


if __name__ == "__main__":
    for n in sys.argv[1:] or sorted(MODULES):
        m = load(n)
        print(f"{n}: {m.__fpm_wheel__}:{m.__fpm_member__} FPM_VERSION={m.FPM_VERSION}")
