"""Fine-tuning a backbone when frozen heads fall short: head only, top blocks, or the whole network.

Recipe (the transfer-learning practice of LP-FT, ULMFiT and layer-wise learning-rate decay):

- The network is the backbone's own feature extractor plus a new linear layer. That layer is
  warm-started from a logistic-regression probe fitted on the network's frozen features at the
  fine-tuning input size, C chosen on validation (LP-FT, Kumar et al. 2022): fine-tuning then
  starts from the probe's accuracy instead of from a random head that wrecks the features.
- Strategies: `head` (only the new layer trains), `partial` (the top `blocks` groups of layers
  also train), `full` (every layer). Groups are the backbone's stages (`Backbone.stages()`),
  the stem with the first stage and what follows the last stage as groups of their own.
  The top trainable group learns at `backbone_lr`, each group below at `layer_decay` times the
  one above; the new layer at `head_lr`. `gradual` unfreezes one more group per epoch, top down.
- BatchNorm: `frozen` keeps the pretrained running statistics (and is the stable choice for
  small batches and small data), `train` updates them.
- Random resized crops (and horizontal flips unless `flip=False`), AdamW with a linear warm-up
  and cosine decay, label smoothing, gradient clipping, autocast (bf16/fp16) on CUDA.
- Early stopping on validation accuracy (ties: lower validation loss); the best epoch is kept.
  Its logits are temperature-scaled on validation, then the **test split is scored once** with
  `heads.evaluate.score`: the same split and metric names as the heads.
- A weights-only checkpoint is written atomically after every epoch in `workdir`; a re-run with
  the same configuration resumes from it, and a finished run (`done.json`) is not retrained.

The result is a backbone of its own: `workdir` holds `backbone.safetensors` (the whole base
network's state dict, its original classifier included), `head.safetensors` and `config.json`
(extractors/embedding/finetuned.py owns that format),
which `extractors.embedding.backbones` loads as `finetuned:<id>`.

Modules, in the order a run goes through them:

  run.py          the entry point (`finetune`, `run_key`): a run's phases, one after another
  data.py         readable images by split, augmentation, data loaders
  network.py      the network (backbone body + new layer), its layer groups, batched outputs
  probe.py        the LP-FT warm start of the new layer
  loop.py         optimiser, schedule, (gradual) unfreezing, the epoch loop, checkpoints
  calibration.py  temperature scaling on validation, the test split's probabilities
  save.py         the `finetuned:<id>` backbone's files
  outcome.py      what a run produced (`FineTuned`), its record `done.json` and its reuse
"""
