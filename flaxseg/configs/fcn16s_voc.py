"""FCN-16s on PASCAL VOC, the second stage of the staged training (``voc-fcn16s/solver.prototxt``):
initialised from a trained FCN-32s, base_lr 1e-12 (a hundredth of FCN-32s'), otherwise as
``fcn32s_voc.py``.

    python train.py --config=flaxseg/configs/fcn16s_voc.py --init_from=runs/fcn32s \\
        --workdir=runs/fcn16s

``--init_from`` copies every parameter whose path and shape match (the VGG layers, fc6/fc7,
score_fr, upscore2's kernel) and reports the rest (score_pool4 starts at zero, as in Caffe).
"""

from flaxseg.configs import fcn32s_voc


def get_config():
    config = fcn32s_voc.get_config()
    config.model.name = "fcn16s"
    config.lr = 1e-12 * fcn32s_voc.CAFFE_PIXELS_PER_IMAGE
    return config
