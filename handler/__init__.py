"""TorchServe and SageMaker serving: the handler, the SageMaker adapter and the server settings.

``handler.py`` and ``inference.py`` are copied into the archives as top-level files (TorchServe and
the SageMaker container import them by path, beside the ``bundle`` package); as a package here they
are importable by the tests and tools.
"""

# The name TorchServe serves the model under (/predictions/skin_lesion) and the archive's file name.
MODEL_NAME = "skin_lesion"
# The handler's file name inside the archives. Not "handler.py": TorchServe imports it by its module
# name, which an installed or PYTHONPATH copy of this package would shadow.
ARCHIVED_HANDLER = "skin_lesion_handler.py"
