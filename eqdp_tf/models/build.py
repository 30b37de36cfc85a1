"""Building the models by name (imports TensorFlow)."""

import tensorflow as tf

from eqdp_tf.models.names import ARCHITECTURES, is_so2
from eqdp_tf.models.resnet9 import check_image_shape as check_resnet9_image_shape
from eqdp_tf.models.resnet9 import equivariant_resnet9
from eqdp_tf.models.resnet9_so2 import so2_resnet9
from eqdp_tf.models.wrn import wide_resnet


def build_model(architecture="eq_resnet9", group="D4", restrict="D2", head="paper", num_classes=10,
                so2_frequency=1, so2_norm_centering="all", **kwargs):
    """Builds a model by name; ``group``/``restrict``/``head`` apply to the (equivariant) ResNet-9, and
    ``so2_frequency``/``so2_norm_centering`` to it with ``group='SO2'`` only (``resnet9_so2``)."""
    if architecture == "eq_resnet9" and is_so2(group):
        return so2_resnet9(frequency=so2_frequency, restrict=restrict, head=head, num_classes=num_classes,
                           norm_centering=so2_norm_centering, **kwargs)
    if architecture == "eq_resnet9":
        return equivariant_resnet9(group=group, restrict=restrict, head=head, num_classes=num_classes, **kwargs)
    if architecture == "wrn16_4":
        return wide_resnet(16, 4, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def check_image_shape(architecture, head, image_shape):
    """Raises ``ValueError`` when ``architecture`` (with ``head``) cannot take images of ``image_shape``: the
    Equivariant ResNet-9 only sizes its pooling tiles (``resnet9.check_image_shape``); the WRN takes any."""
    if architecture == "eq_resnet9":
        check_resnet9_image_shape(image_shape, head)


def with_float32_logits(model):
    """``model`` with float32 logits: under a mixed precision policy (e.g. mixed_bfloat16) the logits, and so the
    loss, would otherwise be computed in low precision (the Keras mixed-precision guide casts the output layer).
    Returns ``model`` itself when its logits already are float32."""
    if model.output.dtype == tf.float32:
        return model
    logits = tf.keras.layers.Activation("linear", dtype="float32", name="logits_fp32")(model.output)
    return tf.keras.Model(model.inputs, logits, name=model.name)
