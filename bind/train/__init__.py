"""Training: a recipe's stages run on a :class:`~bind.model.BindModel`, with checkpoints, logs and data loaders.

:func:`bind.train.trainer.run_recipe` (``from bind import run_recipe``) is the entry point; :mod:`bind.train.stage` runs one stage
(what it freezes, its loaders from :mod:`bind.train.loaders`, its optimizer from :mod:`bind.train.optim`, the
step); :mod:`bind.train.feature_cache` holds frozen trunks' features, :mod:`bind.train.gradcache` embeds large
batches in chunks, :mod:`bind.train.compile` compiles towers and sets memory formats, :mod:`bind.train.checkpoint`
saves and resumes, :mod:`bind.train.monitor` logs and listens
for stop signals, :mod:`bind.train.runlock` keeps one writer per run folder, :mod:`bind.train.multiseed`
summarises runs over several seeds. Only the command line, the benchmarks and ``bind.run_recipe`` import this package.
"""
