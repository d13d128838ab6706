"""`python -m l2d ...` (what `accelerate launch -m l2d train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
