# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``python -m ship_peft`` runs the ``ship-peft`` command line (also under ``accelerate launch -m ship_peft``)."""

from .app.cli import main

raise SystemExit(main())
