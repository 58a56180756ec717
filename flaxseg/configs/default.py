"""Default configuration: the standard PASCAL VOC recipe (DeepLab / MMSegmentation).

crop 513, batch 16, SGD momentum 0.9, poly lr 0.007 (power 0.9), weight decay 1e-4 (kernels only),
30k iterations, random scale 0.5–2.0, horizontal flip. train.py's flags override the common fields;
everything else is `--config.<field>=<value>`.
"""

import ml_collections
from ml_collections import config_dict

from flaxseg.constants import IGNORE_LABEL, VOC_NUM_CLASSES


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "fcn8s"
    config.backbone = ""  # '' = the model's default backbone
    config.model_kwargs = (
        "{}"  # JSON dict of extra constructor arguments, e.g. '{"base_width": 16}'
    )
    config.output_stride = 0  # DeepLab / PSPNet models: 8, 16 or 32; 0 = the model's default
    config.pretrained = ""  # backbone weights file (.pth/.pt/.safetensors; flaxseg.weights)
    config.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators. Params stay float32.
    config.num_classes = VOC_NUM_CLASSES
    # Weight of every auxiliary head's loss; None = the model's default (configs/models.py).
    config.aux_loss_weight = config_dict.placeholder(float)

    # Data.
    config.dataset = "voc2012_aug"
    config.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    config.manual_dir = ""  # where VOC/SBD archives or folders are, for offline builds
    config.ignore_label = IGNORE_LABEL
    config.crop_size = 513
    config.min_scale = 0.5
    config.max_scale = 2.0
    config.worker_count = 0  # grain worker processes for augmentation (0 = in the main process)
    config.eval_batch_size = 8
    config.eval_bucket_multiple = 128

    # Optimisation.
    config.batch_size = 16  # global batch size over all devices and hosts
    config.steps = 30_000
    config.lr = config_dict.placeholder(float)  # None = the model's default (configs/models.py)
    config.lr_power = 0.9
    config.warmup_steps = 0
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.seed = 0

    # Bookkeeping.
    config.log_every = 20
    config.eval_every = 2_000
    config.checkpoint_every = 1_000
    config.keep_checkpoints = 3
    config.progress_bar = True
    return config
