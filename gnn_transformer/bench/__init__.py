"""Tools beside the library: the attention benchmark (:mod:`.benchmark`, the CLI's ``bench``) with
the baselines a user would otherwise run (:mod:`.baselines`: SDPA, FlexAttention's ``mask_mod``
variants), the training-step benchmark against a plain PyTorch GPT (:mod:`.train_step`), the
selection benchmark (:mod:`.selection`) and the GPU compile check of the Triton kernels
(``python -m gnn_transformer.bench.compile_check``). They import :mod:`gnn_transformer.kernels`;
the library never imports them."""
