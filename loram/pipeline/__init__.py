"""The pipeline's stages, one module each, named after the DVC stage that runs it.

Every module defines ``NAME``, ``SECTIONS`` (the params sections its ``run`` takes, in order;
``None``: all of them), ``OPTIONS`` (path and name options with their defaults) and a typed
``run(*sections, **options) -> dict``. ``stages/<name>.py``, the ``loram <name>`` command
(both through :mod:`loram.pipeline.entry`) and the tests call that same ``run``. The order of
the stages is written once, in ``dvc.yaml``.
"""
