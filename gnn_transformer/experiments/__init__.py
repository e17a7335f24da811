"""Experiments on token graphs: built-in tasks, training, the topology comparison, checks.

- :mod:`.tasks` (algorithmic sequences), :mod:`.lm` (character-level language modelling on real
  text), :mod:`.listops` (Long Range Arena ListOps), :mod:`.graph_tasks` (karate club, shortest
  paths), :mod:`.vision_tasks` (ViT on 8x8 digits): data, no download;
- :mod:`.models`: small graph transformers built from :mod:`gnn_transformer.layers`;
- :mod:`.training`: the training loop, logs; :mod:`.checkpoints`: atomic checkpoints and exact
  resumption; :mod:`.distributed`: DDP;
- :mod:`.compare`: the main experiment; :mod:`.verify`: graph attention vs the dense reference;
- :mod:`.topologies`: topology specs as strings; :mod:`.figures`: PNG figures;
- :mod:`.runs`: one training run of any task.
"""
