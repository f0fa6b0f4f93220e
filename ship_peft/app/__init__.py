# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The ``ship-peft`` command line and its training recipes: an application built on the library.

The library (``ship_peft``: config, layer, model, calibration, backbones, presets, registration) never imports this
subpackage, and installs without its dependencies; ``pip install "ship-peft[cli]"`` adds them (matplotlib for the
pictures). See ``docs/cli.md``.
"""
