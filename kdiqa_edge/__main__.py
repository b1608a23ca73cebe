from kdiqa_edge.cli import main

main()
