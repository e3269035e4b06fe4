"""The ``model.py`` of a repository's ``cfgswitch_pipeline`` model (Triton Python backend).

``cfgswitch triton-repo`` copies this file into ``cfgswitch_pipeline/1/model.py``. It is a
shim: it makes ``cfgswitch`` importable inside the backend's stub process and hands every
call to :class:`cfgswitch.serving.pipeline_backend.PipelineBackend`.

How the stub finds ``cfgswitch``: the model's ``python_paths`` parameter lists folders
(``os.pathsep``-separated) that are added with :func:`site.addsitedir` before the import,
so ``.pth`` files there (editable installs, import hooks) take effect too. It is empty when
``cfgswitch`` is installed in the Python the Triton server's stub uses (a container with
``pip install cfgswitch``); ``cfgswitch triton-repo`` fills it with the site-packages of the
interpreter that wrote the repository unless ``--python-path none`` is given. A
``PYTHONPATH`` in the server's environment works as well.
"""

import json
import os
import site
from pathlib import Path


class TritonPythonModel:
    """Triton's entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for folder in params.get("python_paths", "").split(os.pathsep):
            if folder:
                site.addsitedir(folder)
        import triton_python_backend_utils as pb_utils

        from cfgswitch.serving.pipeline_backend import PipelineBackend

        self.pb_utils = pb_utils
        self.backend = PipelineBackend.from_parameters(Path(__file__).resolve().parent, params, config, pb_utils=pb_utils)

    def execute(self, requests):
        return self.backend.execute(requests, self.pb_utils)

    def finalize(self):
        self.backend.close()
