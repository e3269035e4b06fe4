"""The shapes world and the embedded default model trained on it.

- :mod:`.world`: scenes, their renderer and ground truth;
- :mod:`.captions`: the caption grammar;
- :mod:`.scorer`: the weight-free scorer of generated images;
- :mod:`.train`: the training recipe behind ``cfgswitch train-shapes``.
"""
