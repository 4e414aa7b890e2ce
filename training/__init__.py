"""The training scripts (DreamBooth, VTAB-1k, LLM fine-tuning, the digits base), importable as a package.

Each script runs as ``python training/<script>.py`` (or ``accelerate launch training/<script>.py``) and is
imported as ``training.<script>`` (benchmarks, tests); either way the scripts import each other absolutely
(``from training.common import save_checkpoint``), which works once the project is installed
(``pip install -e .``; from a checkout without installing, put its root on ``PYTHONPATH``).
"""
