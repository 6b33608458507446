"""``python -m rooftop`` is ``agentctl``."""

from rooftop.cli import main

main()
