"""Default configuration: the standard PASCAL VOC recipe (DeepLab v3 / MMSegmentation).

crop 513, batch 16, SGD momentum 0.9, poly lr 0.007 (power 0.9), weight decay 1e-4 (kernels only),
30k iterations, random scale 0.5–2.0, horizontal flip, cross-entropy ignoring label 255.

`python train.py --model=X` trains with this file; `--config=flaxseg/configs/<recipe>.py` picks a
paper's recipe instead (each recipe starts from this file and changes what its paper changes).
train.py's flags override the common fields (flaxseg/training/cli.py's SHORTCUTS says which field
each sets); every field is `--config.<field>=<value>`, e.g. `--config.model.backbone=resnet50`.
"""

import ml_collections
from ml_collections import config_dict

from flaxseg.constants import IGNORE_LABEL


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: what `flaxseg.models.create_model(**config.model, num_classes=..., dtype=...)` builds
    # (flaxseg/training/spec.py does exactly that, through the spec recorded in checkpoints).
    config.model = ml_collections.ConfigDict()
    config.model.name = "fcn8s"  # a name of flaxseg.models.list_models(); flag --model
    config.model.backbone = ""  # '' = the model's default backbone; flag --backbone
    # Further constructor arguments, a dict, e.g. {"base_width": 16} or, for DeepLab / PSPNet
    # models, {"output_stride": 8} (8, 16 or 32; absent = the model's default). The
    # --model_kwargs='{...}' flag (JSON) and --output_stride are merged into a recipe's dict
    # (flag entries win); --config.model.kwargs.<name>=<value> changes an argument the recipe
    # already sets.
    config.model.kwargs = {}
    config.pretrained = ""  # backbone weights file (.pth/.pt/.safetensors; flaxseg.weights)
    # Workdir of another run whose latest checkpoint initialises every parameter of this model
    # with the same path and shape (FCN's staged training: 16s from 32s, 8s from 16s).
    config.init_from = ""
    config.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators. Params stay float32.
    # Rematerialise the backbone's repeated units (ResNet/Xception/MobileNetV2/EfficientNet
    # blocks) in the backward pass: less device memory for about one more backbone forward pass.
    # Not part of the model spec: a run may be resumed with or without it.
    config.remat = False
    config.num_classes = config_dict.placeholder(int)  # None = the dataset's class count
    # Weight of every auxiliary head's loss; None = the model's default (configs/models.py).
    config.aux_loss_weight = config_dict.placeholder(float)

    # Data.
    config.dataset = "voc2012_aug"  # a name of flaxseg.data.list_datasets()
    config.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    config.manual_dir = ""  # where the archives or their extracted folders are
    config.ignore_label = IGNORE_LABEL
    config.crop_size = 513
    config.min_scale = 0.5
    config.max_scale = 2.0
    config.worker_count = 0  # grain worker processes for augmentation (0 = in the main process)
    config.eval_batch_size = 8
    config.eval_bucket_multiple = 128

    # Loss: one name of flaxseg.losses.list_losses() or a weighted sum such as
    # 'cross_entropy+0.5*dice'. Auxiliary heads are scored with the same expression.
    config.loss = "cross_entropy"
    config.class_weights = ()  # one weight per class; () = unweighted
    config.label_smoothing = 0.0  # cross_entropy / ohem_cross_entropy
    config.ohem_thresh = 0.7  # ohem_cross_entropy: keep pixels whose true-class prob < thresh
    config.ohem_min_kept = 100_000  # ... but at least this many per image (MMSegmentation)
    config.focal_gamma = 2.0  # focal
    # Where the losses are taken: 'input' (on logits upsampled to the input's size) or
    # 'score_map' (on the model's score maps before that upsampling, against labels shrunk to
    # their size: Caffe DeepLab v1/v2's label_shrink; flaxseg/training/steps.py).
    config.loss_resolution = "input"

    # Optimisation.
    config.batch_size = 16  # global batch size over all devices and hosts
    config.steps = 30_000
    config.lr = config_dict.placeholder(float)  # None = the model's default (configs/models.py)
    config.lr_schedule = "poly"  # 'poly', 'step' (× lr_gamma every lr_step_size) or 'constant'
    config.lr_power = 0.9
    config.lr_step_size = 0
    config.lr_gamma = 0.1
    config.warmup_steps = 0
    config.momentum = 0.9
    config.weight_decay = 1e-4  # on kernels; biases and BatchNorm parameters get none
    # Per-parameter rules (Caffe's lr_mult/decay_mult): an ordered tuple of dicts
    # {'pattern': regex on the parameter path, 'lr_mult': float, 'weight_decay': float};
    # the first match decides. See flaxseg/training/optim.py.
    config.param_groups = ()
    config.seed = 0
    # Accumulate the gradients of this many micro-batches per step (it must divide the
    # per-device batch): the same update as the whole batch for pixel-sum losses
    # (cross-entropy, focal) in a fraction of the activation memory; BatchNorm then normalises
    # each micro-batch by its own statistics.
    config.grad_accum = 1
    # 'jit': one program over a device mesh (the default); 'pmap': jax.pmap over each host's
    # devices with cross-device sums and synchronised BatchNorm: the same update.
    config.parallel = "jit"
    # A non-finite loss or gradient stops the run (naming the step and the last good
    # checkpoint); with True such updates are skipped instead and counted (train/nonfinite).
    config.skip_nonfinite = False

    # Adversarial training (Luc et al. 2016; flaxseg/training/adversarial.py): '' = off, else the
    # adversary's input encoding 'basic', 'product' or 'scaling'.
    config.adversarial = ""
    config.adversary = "largefov"  # flaxseg.models.adversarial.list_adversaries()
    config.adversary_kwargs = {}  # the adversary's constructor arguments, e.g. {"width": 0.25}
    # λ of the segmenter's adversarial term on the paper's scale (see adv_normalization);
    # None = the adversary's value in Luc et al.'s experiments (1, or 0.1 for smallfov).
    config.adv_weight = config_dict.placeholder(float)
    # 'pixels': λ·Σ BCE / (non-ignored pixels), i.e. the paper's per-image summed cross-entropy
    # + λ·BCE divided by the pixel count; 'images': λ·mean BCE (flaxseg < 2026-12, ~H·W× more).
    config.adv_normalization = "pixels"
    # The adversary sees the maps sampled every this many pixels; None = the adversary's
    # paper setting (8 for the VOC nets, 4 for stanford); 1 = full resolution.
    config.adv_input_stride = config_dict.placeholder(int)
    config.adv_tau = 0.9  # 'scaling': least mass on the true class of a ground-truth map
    config.adv_optimizer = "adam"  # 'adam' or 'sgd' (momentum = config.momentum)
    config.adv_lr = 1e-4
    config.adv_pretrain_steps = 0  # adversary-only steps first (the segmenter waits)
    config.adv_updates = 1  # adversary updates per segmenter update

    # Bookkeeping.
    config.log_every = 20
    config.eval_every = 2_000
    config.checkpoint_every = 1_000
    config.keep_checkpoints = 3
    config.progress_bar = True
    return config
