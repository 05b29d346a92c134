"""Caltech-101 (97 classes), block 5 fine-tuned on cached block4_pool features, GAP + Dense head.

The reference's suggested exercise: "try out both, and compare" with the frozen feature extractor.
The two-phase recipe: the head is fitted first (phase 1, as `caltech101`), then block 5 trains from
it at the default config's Adam 1e-4, constant: over 3 seeds valid 0.9207 against 0.9168 for
Adam 3e-5 with warmup and cosine, higher in each seed (benchmarks/RESULTS.md, "The default's
phase 2 on both datasets"), and 0.9271 with 5 epochs instead of 3, again higher in each seed
(each 3-epoch run was still at its best in its last epoch). No label smoothing: from a fitted
head (train loss 0.02) it pulled every logit toward uniform, and block 5 then lost to the head on
valid (0.904-0.906 against 0.915); without it block 5 beats the head (benchmarks/RESULTS.md,
"Label smoothing held block 5 back").
"""
from flaxtl.configs import caltech101


def get_config():
  c = caltech101.get_config()
  c.trainable = "block5"
  c.batch_size = 32
  c.eval_batch_size = 64
  c.epochs = 5  # chosen on valid over 3 (see the docstring); ~4 min an epoch on a 2-core CPU
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4  # the default's phase 2; 3e-5 + cosine lost on valid
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_epochs = 0.0
  c.label_smoothing = 0.0  # chosen on valid: 0.1 cost block 5 ~1 point (see the docstring)
  return c
