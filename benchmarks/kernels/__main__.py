"""``python -m benchmarks.kernels``: see ``benchmarks.kernels.cli``."""
import sys

from benchmarks.kernels.cli import main

sys.exit(main())
