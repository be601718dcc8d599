"""Code both relay sides import: the link protocol and the link, HTTP/1.1 pieces, settings."""

from pathlib import Path

# First: shared/compiled.py decides where the compiled data-path modules are imported from. The
# bootloader's zipapp (portal/getsite.py) carries only a few pure modules of this package.
if (Path(__file__).parent / "compiled.py").is_file():
    from shared import compiled as compiled
