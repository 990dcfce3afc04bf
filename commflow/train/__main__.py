"""``python -m commflow.train`` (spawns local workers) and ``torchrun -m commflow.train`` (one rank)."""

from .cli import main

main()
