"""Sign Language Digits: VGG16 (ImageNet), block 5 fine-tuned on cached block4_pool features.

The reference recipe (Elgendy, ch. 6): last conv block trainable, GAP, Dense(10), Adam 1e-4, ~98%.
Here block 5 trains behind a random head (`head_init='random'`), as in the reference: chosen on the
validation split over the two-phase recipe (probe head first), which reached 0.9767-0.9867 valid
against 0.9933 at 112 px (benchmarks/RESULTS.md, "The recipe"), and at 224 px lost in both CV
folds run (0.9901, 0.9801 against 0.9950, 0.9926: "sign_digits: label smoothing, by CV"). Hands at
100 px are far from ImageNet: block 5 must move, and a head fitted to its pretrained features
holds it back. The head stays Keras' plain GAP + Dense: the power-normalised head (the default
elsewhere) reached valid 0.9833 (112 px, seed 0). Label smoothing 0.1: 5-fold CV 0.9975 against
0.9945 without, at or above it in every fold, where EMA, mixup, a probe head, cosine decay and 12
epochs did not beat plain training (benchmarks/RESULTS.md, "sign_digits: label smoothing, by CV").
Our reading (not tested apart): unlike Caltech's fitted head (caltech101_finetune.py), a random
head is not yet confident, so the smoothed targets regularise instead of pulling every logit to
uniform.
"""
from flaxtl.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "sign_language_digits"
  # The 100 px photographs upsampled to the reference's 224: 5-fold CV over train+valid, 0.9955
  # against 0.9871 at 112 px, 18 images right only at 224 and 2 only at 112 of 2,012 (p = 0.0004),
  # at 3-4x the time in XLA float32 (benchmarks/RESULTS.md, "sign_digits: 112 or 224 px"). On an
  # AMX CPU block 5 trains in oneDNN bf16 (train_engine='auto'): ~4 min from an empty cache on
  # the 2-core Xeon, CV 0.9945 ("The training step in bf16"). 112 is the fast option elsewhere.
  c.data.image_size = 224
  c.trainable = "block5"
  c.head_init = "random"
  c.model.head = "gap"
  c.batch_size = 32
  c.epochs = 8
  c.label_smoothing = 0.1  # chosen by 5-fold CV over train+valid (see the docstring)
  return c
