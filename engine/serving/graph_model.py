"""The ``model.py`` of an engine model in an ``onnxruntime-bls`` repository (Triton Python backend).

``cfgswitch triton-repo --engines onnxruntime-bls`` lays a repository out as the
``tensorrt`` one (text encoder, UNet roles and VAE as separate models the pipeline calls
over BLS) but serves each engine's ONNX graph (``model.onnx`` next to this file) with ONNX
Runtime, so the BLS pipeline runs on a CPU-only Triton. Input and output names are the
graph's, as in the TensorRT plans built from it. The ``python_paths`` parameter works as in
the pipeline model.
"""

import json
import os
import site
from pathlib import Path


class TritonPythonModel:
    """One ONNX graph on ONNX Runtime (CPU), one run per request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for folder in params.get("python_paths", "").split(os.pathsep):
            if folder:
                site.addsitedir(folder)
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        opts = ort.SessionOptions()
        if params.get("threads"):
            opts.intra_op_num_threads = int(params["threads"])
        path = Path(__file__).resolve().parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        pb = self.pb_utils
        responses = []
        for request in requests:
            try:
                feeds = {n: pb.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                outs = self.session.run(self.outputs, feeds)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, o) for n, o in zip(self.outputs, outs)]))
            except Exception as e:  # noqa: BLE001 - answered as this request's error
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses

    def finalize(self):
        self.session = None
