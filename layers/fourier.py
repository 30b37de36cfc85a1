"""The Fourier-sampled ELU of band-limited SO(2) fields (escnn's ``FourierELU``, the official code's non-linearity for
``group: orthogonal``, with N = 16).

Each field's coefficients are read as a function on the circle, sampled at N equally spaced angles (the inverse
Fourier transform, ``so2.fourier_sampling``'s A), ELU is applied to each sample, and the samples go back to
coefficients (A_inv). No weights. A rotation by a multiple of 2 pi / N only permutes the samples, so the layer is
exactly equivariant for those (90 degrees included when 4 divides N); between them ELU's higher harmonics alias onto
the kept ones and equivariance is approximate.
"""

import tensorflow as tf

from layers import _fields
from layers import so2


@tf.keras.utils.register_keras_serializable(package="eqdp")
class FourierELU(tf.keras.layers.Layer):
    """``[..., F * (2L + 1)]`` band-limited fields -> the same, ELU applied at ``samples`` angles of each field."""

    def __init__(self, frequency=1, samples=so2.OFFICIAL_SAMPLES, **kwargs):
        super().__init__(**kwargs)
        self.frequency = so2.check_frequency(frequency)
        a, a_inv = so2.fourier_sampling(self.frequency, samples)  # raises for too few samples
        self.samples = int(samples)
        self._to_samples = a.T.astype("float32")  # [2L+1, N]
        self._to_coefficients = a_inv.T.astype("float32")  # [N, 2L+1]

    def build(self, input_shape):
        fields = _fields.band_limited_fields_in(self.name, input_shape, self.frequency)
        self.input_spec = tf.keras.layers.InputSpec(min_ndim=2, axes={-1: fields * so2.field_size(self.frequency)})
        super().build(input_shape)

    def call(self, inputs):
        shape = tf.shape(inputs)
        size = so2.field_size(self.frequency)
        fields = tf.reshape(inputs, tf.concat([shape[:-1], [-1, size]], axis=0))
        samples = tf.nn.elu(tf.matmul(fields, tf.cast(self._to_samples, inputs.dtype)))
        return tf.reshape(tf.matmul(samples, tf.cast(self._to_coefficients, inputs.dtype)), shape)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "frequency": self.frequency, "samples": self.samples}
