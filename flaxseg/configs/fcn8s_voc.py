"""FCN-8s on PASCAL VOC, the last stage of the staged training (``voc-fcn8s/solver.prototxt``):
initialised from a trained FCN-16s, base_lr 1e-14, otherwise as ``fcn32s_voc.py``.

    python train.py --config=flaxseg/configs/fcn8s_voc.py --init_from=runs/fcn16s \\
        --workdir=runs/fcn8s

The single-stage alternative, ``voc-fcn8s-atonce`` (pool4 scored ×0.01 and pool3 ×0.0001 so
that all skips can be learned at once from VGG16), is this recipe with
``--model_kwargs='{"at_once": true}'`` and ``--pretrained`` instead of ``--init_from``.
"""

from flaxseg.configs import fcn32s_voc


def get_config():
    config = fcn32s_voc.get_config()
    config.model.name = "fcn8s"
    config.lr = 1e-14 * fcn32s_voc.CAFFE_PIXELS_PER_IMAGE
    return config
