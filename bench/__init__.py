"""morag benchmark suite: ``bench/run`` (see bench/README.md)."""
