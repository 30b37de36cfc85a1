"""Input handling shared by all models: raw pixels in, standardised floats out (per channel; by default with the
CIFAR-10 constants of the paper's setting, the training program passes its dataset's).

Normalising inside the model means the SavedModel takes raw uint8 images, as a server receives them.
"""

import tensorflow as tf

from eqdp_tf.datasets.spec import CIFAR10_MEAN, CIFAR10_STD


def standardized_input(image_shape=(32, 32, 3), mean=CIFAR10_MEAN, std=CIFAR10_STD, name="image"):
    """Returns ``(inputs, standardized)``: a Keras input for raw [0, 255] pixels and its normalised form."""
    inputs = tf.keras.Input(image_shape, name=name)
    scaled = tf.keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    standardized = tf.keras.layers.Normalization(
        axis=-1, mean=list(mean), variance=[s * s for s in std], name="standardize"
    )(scaled)
    return inputs, standardized
