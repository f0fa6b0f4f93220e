# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Files shipped inside the package, so that ``ship-peft train`` runs offline on a fresh machine.

* ``tiny-vit-fractal-1k/``: a small ViT pretrained on synthetic fractal images (see its README, rebuilt by
  ``examples/pretrain_fractal_vit.py``), the default backbone;
* ``digits/``: scikit-learn's 8x8 handwritten digits (see its README for provenance and licence), the default data.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent

#: Name under which the bundled backbone is recorded in adapters (``base_model_name_or_path``) and accepted by
#: ``--model``.
BUNDLED_BACKBONE = "tiny-vit-fractal-1k"

DIGITS_FILE = ASSETS_DIR / "digits" / "digits.npz"


def bundled_backbone_path() -> Path:
    """Folder of the bundled ``tiny-vit-fractal-1k`` checkpoint (load it with ``from_pretrained``)."""
    return ASSETS_DIR / BUNDLED_BACKBONE


def resolve_model_path(name_or_path: str) -> str:
    """``name_or_path`` unchanged, except the bundled backbone's name, which becomes its folder."""
    return str(bundled_backbone_path()) if name_or_path == BUNDLED_BACKBONE else name_or_path
