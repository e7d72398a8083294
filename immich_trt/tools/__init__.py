"""Build and test tooling that serving code never imports: the test pack of models,
``immich-trt bench``, helpers for tests and smoke checks, and (``tools.gpu``) the GPU
target's engine, DALI and ensemble builders."""
