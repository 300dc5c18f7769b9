"""What every recipe shares, apart from the data (`bidrop_ds.data`) and the models (`bidrop_ds.models`).

- `cli`: the one-line-error argument parser.
- `dist`: distributed start and stop (gloo on CPU, nccl on CUDA), lost-contact reports, small
  collectives, and loading on rank 0 first with mistakes reported on every rank (`LoadError`).
- `deepspeed_config`: a DeepSpeed JSON config filled for a global batch and checked, with its
  optional "bidrop" section layered under the Bi-Drop flags.
- `loaders`: fixed subsets and the train / held-out loaders of one process or of every rank.
- `loop`: the training loop (progress, skip accounting, save and resume) and the resume check.
- `evaluate`: distributed evaluation, the per-epoch dev selection and the best-epoch restore.
- `suite`: a study's runs of a recipe as subprocesses, resumable.
"""
