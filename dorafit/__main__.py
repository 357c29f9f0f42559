"""``python -m dorafit`` (also what ``torchrun -m dorafit`` runs)."""

import sys

from .cli import main

sys.exit(main())
