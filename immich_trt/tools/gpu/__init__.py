"""The NVIDIA GPU target: TensorRT engines, DALI preprocessing and Triton ensembles."""
