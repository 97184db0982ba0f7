"""What the tests share besides fixtures (those stay in ``tests/conftest.py``), by role:

- ``checkpoints``: the real MiniLM checkpoint, a seeded tiny Llama;
- ``processes``: running the CLI and the ``tools/`` scripts;
- ``architectures``: the model families the integration tests run over;
- ``bnb_reference``: bitsandbytes as the byte-for-byte reference;
- ``kernel_emulation``: the CUDA kernels compiled for the CPU.

``tests/`` is on ``sys.path`` (pyproject's ``[tool.pytest.ini_options] pythonpath``), so tests import
``helpers.<module>`` from the source tree and against the installed wheel alike."""
