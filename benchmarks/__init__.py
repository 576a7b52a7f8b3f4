"""Speed and memory benchmarks of editlens (``python -m benchmarks all --quick --device cpu``)."""
