"""Defaults every workload config starts from: `config = default.get_config()` then override."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = ""              # folder under $FLAXTL_DATA_DIR (default ~/.cache/flaxtl/datasets)
  c.data.root = ""              # explicit data root; wins over name
  c.data.subdir = ""            # path inside the named root (e.g. 101_ObjectCategories)
  c.data.layout = "split_folders"   # or 'class_folders' (split by flaxtl), 'csv', or 'tfds'
  c.data.csv = "labels.csv"     # layout='csv': columns path,label[,split], paths relative to the
                                # CSV's folder; the CSV relative to the data root unless absolute
  c.data.tfds_name = ""         # with layout='tfds': a prepared builder, or 'image_folder' over root
  c.data.tfds_data_dir = ""
  c.data.tfds_splits = ml_collections.ConfigDict(dict(
      train="train", valid="validation", test="test"))
  c.data.exclude = ()           # class folders to leave out
  c.data.split_fractions = (0.7, 0.15, 0.15)
  c.data.split_seed = -1        # -1: use config.seed
  c.data.max_per_class = 0      # >0: keep the first N files of each class (quick runs, tests)
  c.data.image_size = 224
  c.data.max_pixels = 50_000_000
  c.data.on_bad_image = "skip"  # or 'error': stop before training, naming the files
  # k-fold cross-validation (set by `python -m flaxtl.cv`; a fold can also be trained alone):
  # cv_folds > 0 makes train/valid fold cv_fold of a stratified split of train+valid (+test with
  # cv_include_test), seeded by data.split_seed (else config.seed).
  c.data.cv_folds = 0
  c.data.cv_fold = 0
  c.data.cv_include_test = False
  # policy='trivial': TrivialAugment Wide after the above (one op of 13 per image, random
  # magnitude; flaxtl/input_pipeline.py), with or without the cache (augment_views)
  c.data.augment = ml_collections.ConfigDict(dict(
      flip=False, crop_min_scale=1.0, rotation_deg=0.0, brightness=0.0, contrast=0.0,
      policy=""))
  # >0 with `augment` on: keep the feature cache. The frozen trunk runs once more per view over
  # train (view v: `augment` seeded by (v, image)); each epoch every image uses one of its
  # 1 + augment_views stored versions (plain or a view), drawn by (seed, epoch): resume exact.
  # 0 with `augment` on: augment every epoch from images, no cache (the trunk runs every step).
  c.data.augment_views = 0
  # 'balanced': each epoch's order draws every class equally often (with replacement, the epoch
  # as long as train), a pure function of (seed, epoch); 'shuffle': a permutation of train.
  c.data.sampler = "shuffle"

  c.model = ml_collections.ConfigDict()
  c.model.name = "vgg16"        # or 'resnet50', 'mobilenet_v2', 'efficientnet_b0' (Keras' files),
                                # 'resnet50_torchvision' (torchvision's v1.5, from its tensors),
                                # 'small_cnn' (trained from scratch)
  c.model.weights = ""          # converted .msgpack, Keras .h5 or torchvision file; '' = Keras'
                                # official file (its cache, else downloaded); 'none' = random init
  # True (fastai's train_bn): every batch norm's scale and bias trains, frozen stages' included
  # (their statistics then update too; nothing before them can be cached). Backbones with BN only.
  c.model.train_bn = False
  # Before every evaluation, the trainable batch norms' running averages are replaced by the mean
  # batch statistics of this many of the epoch's batches (flaxtl/precise_bn.py): the averages lag
  # the weights, badly when training from random weights. -1: 50 with weights='none', else 0.
  c.model.precise_bn = -1
  # 'gap_norm': global average pool, power normalisation (sqrt, L2), Dense: the linear head's val
  # accuracy +2.3 points on Caltech-97, +2.0 on sign_digits (benchmarks/RESULTS.md).
  # 'gap': global average pool + Dense (Keras' own); 'keras_top': fc1, fc2, Dense.
  c.model.head = "gap_norm"
  c.model.dtype = "float32"     # or 'bfloat16' (params and optimizer state stay float32)

  c.trainable = "block5"        # see flaxtl/freezing.py: all | head | block4 | block5_conv2 | ...
  # The recipe, in two phases. Phase 1 fits the new Dense head to convergence on the cached GAP
  # features ('probe': L2 logistic regression by L-BFGS, L2 chosen on valid; seconds). With
  # trainable='head' that is the whole run; otherwise phase 2 trains `trainable` from that head.
  c.head_init = "probe"         # or 'random': the head starts random (the reference recipe)
  # The bar: the same closed-form probe, fitted and reported at the start of every run whatever
  # head_init (with 'random' it costs a GAP feature pass, cached once), and few-shot numbers
  # (ridge on k train images per class) from the same features. Neither changes the training.
  c.report_probe = True
  c.probe_shots = (1, 5, 10)    # () : no few-shot numbers
  c.label_smoothing = 0.0       # phase 2's training loss (optax.smooth_labels); eval is plain CE
  # 'balanced': class c's loss weighted n / (k * count_c) from train's counts (sklearn's), in the
  # probe's objective (phase 1) and phase 2's loss alike; evaluation losses stay unweighted.
  c.class_weight = "none"
  c.mixup_alpha = 0.0           # >0: mixup in phase 2, lambda ~ Beta(a, a); on cached features
                                # it mixes the boundary activations (manifold mixup): cache kept
  c.cutmix_alpha = 0.0          # >0: CutMix in phase 2 (with mixup too: one of them per step);
                                # on cached spatial features the box is cut in feature space
  c.ema_decay = 0.0             # >0: keep an EMA of the weights; it is what is evaluated and exported
  c.wise_alphas = ()            # WiSE-FT: after phase 2, these mixes (1-a)*phase 1 + a*phase 2
                                # are evaluated on valid; one that beats every epoch is kept
  c.early_stopping_patience = 0  # >0: stop after this many epochs without a better val; best kept
  c.select_best_by = "accuracy"  # or 'macro_f1': the best checkpoint (and the probe's L2) by val
                                # macro-F1, then val loss (imbalanced data: every class counts)
  c.feature_cache = True        # cache the frozen trunk's output when nothing random precedes it
  c.cache_dir = ""              # '' = $FLAXTL_CACHE_DIR or ~/.cache/flaxtl
  # What computes the cached features (flaxtl/feature_engine.py): 'xla'; for VGG16 'winograd'
  # (XLA with Winograd F(4x4,3x3) convolutions, float32), or TensorFlow's oneDNN: 'tf' (float32)
  # or 'tf_bf16' (bf16 units: AMX, AVX512-BF16; features cached apart from float32 ones).
  # 'auto': a short probe, once per machine, picks the fastest.
  c.feature_engine = "auto"
  # What runs the training step's trainable VGG16 conv layers: 'xla' (the model's dtype), or
  # 'tf_bf16' (TensorFlow's oneDNN in bf16, one CPU device). 'auto': 'tf_bf16' on a CPU with AMX
  # (3.1x the block 5 step at 224 px there, no difference by CV), else 'xla'. Evaluation: XLA.
  c.train_engine = "auto"

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, momentum=0.9, weight_decay=1e-4,
      schedule="constant", warmup_epochs=0.0, grad_clip=0.0,
      lr_mults="",              # 'REGEX:MULT,...' on 'layer/leaf' paths, first match wins
      plateau_patience=0,       # >0: LR x plateau_factor after this many epochs without a
      plateau_factor=0.1))      # lower val loss (ReduceLROnPlateau); 0 = off
  c.batch_size = 32             # global batch, split over all devices of all processes
  c.eval_batch_size = 64
  c.epochs = 10
  c.train_steps = 0             # >0: train exactly this many steps (overrides epochs)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 0  # 0: at each epoch end only
  return c
