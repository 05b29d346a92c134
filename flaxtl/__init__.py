"""flaxtl: transfer learning for image classification in JAX/Flax."""
