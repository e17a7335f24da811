"""Tools beside the library: the attention benchmark (:mod:`.benchmark`, the CLI's ``bench``) and the
GPU compile check of the Triton kernels (``python -m gnn_transformer.bench.compile_check``). They
import :mod:`gnn_transformer.kernels`; the library never imports them."""
