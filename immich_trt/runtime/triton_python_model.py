"""Triton python-backend model that runs one ONNX file with onnxruntime (CPU target).

This file is copied as ``<repository>/<model>/1/model.py`` by
:mod:`immich_trt.runtime.repository`. Parameters (``config.pbtxt``): ``onnx_path``,
``inter_op_num_threads``, ``intra_op_num_threads``, ``arena``.

Triton's dynamic batcher hands ``execute`` several requests at once; requests whose
inputs share a shape are concatenated along the batch axis and run together, the
others run separately (images of different sizes cannot share a batch).
"""

import os
import sys

# The backend stub ignores PYTHONPATH and puts the base interpreter's site-packages
# first: put this installation's site-packages and the immich_trt package root first.
for _path in (
    os.environ.get("IMMICH_TRT_PACKAGE_ROOT") or "@PACKAGE_ROOT@",
    os.environ.get("IMMICH_TRT_SITE_PACKAGES") or "@SITE_PACKAGES@",
):
    if _path and not _path.startswith("@") and _path not in sys.path:
        sys.path.insert(0, _path)

import json  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from immich_trt.runtime.onnxruntime import make_session  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = params["onnx_path"]
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"ONNX file not found: {path}")
        self.session = make_session(
            path,
            inter_op=int(params.get("inter_op_num_threads", "1")),
            intra_op=int(params.get("intra_op_num_threads", "2")),
            arena=params.get("arena", "true") == "true",
            spinning=params.get("allow_spinning", "true") == "true",
        )
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        # unbatched models (max_batch_size 0) take each request whole, outputs unsliced
        self.batching = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            except Exception as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {exc}"))
                continue
            if self.batching:
                key = tuple((name, feed[name].shape[1:], feed[name].dtype.str) for name in self.inputs)
            else:
                key = ("request", i)
            groups.setdefault(key, []).append((i, feed))
        for items in groups.values():
            try:
                if len(items) == 1:
                    batch = items[0][1]
                else:
                    batch = {name: np.concatenate([feed[name] for _, feed in items]) for name in self.inputs}
                results = self.session.run(self.outputs, batch)
            except Exception as exc:
                for i, _ in items:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {exc}"))
                continue
            offset = 0
            for i, feed in items:
                n = feed[self.inputs[0]].shape[0] if self.batching else None
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value if n is None else value[offset : offset + n]))
                    for name, value in zip(self.outputs, results)
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                offset += n or 0
        return responses

    def finalize(self):
        self.session = None
