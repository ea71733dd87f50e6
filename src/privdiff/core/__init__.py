"""The core floor: what methods, attacks, evaluation and the HE service all stand on.

- :mod:`.training`: the one training loop (:func:`~.training.train_denoiser`) and its parts;
- :mod:`.denoisers`: the device, the recipe's denoiser around a network, a trained run's denoiser and decoder;
- :mod:`.generation`: drawing images from a trained denoiser, and the class grid;
- :mod:`.stages`: the private data of a recipe or run, public data, public pretraining, the result type;
- :mod:`.proxy`: the proxy membership attacker that PrivateLoRA trains against and the proxy attack reuses.

Nothing here imports :mod:`privdiff.methods`, :mod:`privdiff.attacks`, :mod:`privdiff.evaluation` or
:mod:`privdiff.he` (tests/test_architecture.py walks the imports). The privacy side of each step
(admission, calibration, the per-step guard) lives one floor below, in :mod:`privdiff.privacy.budget`.
"""
