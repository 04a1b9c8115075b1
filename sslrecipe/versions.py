"""The versions of sslrecipe's file formats, in one place free of imports (the recipe schema, the run-directory
reader and the TUI use them without loading torch).

Raise a number when a change would make an older sslrecipe misread that format: the older one then refuses it
with one message (upgrade) instead of reading it wrong. Adding an optional key with a default is not such a change.
"""

RECIPE_VERSION = 1  # the recipe's `version:` key; a recipe without it is this version
RUN_LAYOUT_VERSION = 1  # RUN/format.json, written by every run
LEGACY_RUN_LAYOUT = 1  # a run directory without format.json (written before it existed) is in this layout
