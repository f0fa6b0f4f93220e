# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The ``ship-peft`` command line and its training recipes: an application built on the library.

The library (``ship_peft``: config, layer, model, calibration, backbones, presets, registration) never imports this
subpackage, and installs without its dependencies; ``pip install "ship-peft[cli]"`` adds them (matplotlib for the
pictures). See ``docs/cli.md``.
"""

try:  # what only the application needs; the library installs without it
    import matplotlib  # noqa: F401
    import PIL  # noqa: F401
except ImportError as error:
    raise ImportError(
        f"The ship-peft command line needs matplotlib and pillow ({error.name or error} is missing); install it with "
        f'`pip install "ship-peft[cli]"`.'
    ) from error
