"""`python -m kdiqa_edge.cli` (and `torchrun ... -m kdiqa_edge.cli distill ...`): the same CLI as `kdiqa-edge`."""

from kdiqa_edge.cli import main

main()
