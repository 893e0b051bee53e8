"""The ``deltamem-edge`` command line (installed as ``deltamem_edge.cli``).

One small module per verb, registered in ``main.py``; heavy imports happen inside
the commands so that ``--help`` stays instant.
"""
