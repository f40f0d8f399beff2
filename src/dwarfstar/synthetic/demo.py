"""The demo model behind ``--demo``: the real architecture and tokenizer, seeded random weights.

It is built once into the user's cache directory (``$XDG_CACHE_HOME/dwarfstar`` on Linux,
the platform's cache folder elsewhere; ``DS4_CACHE_DIR`` overrides both), never into the
working directory. The file name carries a digest of everything that shapes the file, so a
changed demo is rebuilt rather than a stale one reused. Its answers are noise: it shows that
the whole path runs, not what the model knows.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

# Bump when the generator changes the bytes it writes for the same configuration.
DEMO_REVISION = 1
DEMO_SEED = 0


def cache_dir() -> Path:
    """Where dwarfstar keeps files it can rebuild (the demo model)."""
    override = os.environ.get("DS4_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return platformdirs.user_cache_path("dwarfstar", appauthor=False)


def demo_model_path() -> Path:
    """The demo GGUF, built on first use (atomically: concurrent first uses are safe)."""
    from gguf import GGMLQuantizationType as T

    from dwarfstar.synthetic.models import DEMO_CONFIG, uniform_policy, write_random_model

    digest = hashlib.sha256(f"{DEMO_CONFIG!r} seed={DEMO_SEED} rev={DEMO_REVISION}".encode()).hexdigest()
    path = cache_dir() / f"demo-{digest[:12]}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stderr.isatty()
    if terminal:
        print(f"building the demo model (once) in {path.parent} ...", file=sys.stderr)
    staged = path.with_name(f"{path.stem}.{os.getpid()}.tmp.gguf")
    try:
        write_random_model(staged, DEMO_CONFIG, uniform_policy(T.Q8_0), seed=DEMO_SEED, progress=terminal)
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)
    return path
