"""What the chapters need to present results: formatting, computed verdict sentences, plots, run files.

Chapters stay short because the presentation logic lives here, tested, instead of being re-defined in
each notebook. Nothing here trains or measures anything: every function turns numbers that a chapter
already computed into a string, a table or a figure.
"""

from __future__ import annotations

# ============================================================================ general (chapters 1-4, 6)


# ============================================================================ comparison (chapter 5)
