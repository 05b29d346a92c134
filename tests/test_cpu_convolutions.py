"""`import flaxtl` must switch XLA:CPU from YNNPACK to its own convolutions (1.3-1.8x faster VGG16
steps here, benchmarks/RESULTS.md), after `import jax` too, and leave the user's choice alone."""
import os
import subprocess
import sys

PROBE = """
import jax, jax.numpy as jnp
import flaxtl
x, w = jnp.ones((8, 28, 28, 64)), jnp.ones((3, 3, 64, 64))
f = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
print("YNN" if "__ynn_fusion" in jax.jit(jax.grad(f)).lower(w, x).compile().as_text() else "EIGEN")
"""


def _backend(**env) -> str:
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FLAXTL_XLA_DEFAULTS")}
  out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-1]


def test_flaxtl_selects_xla_own_convolutions():
  assert _backend() == "EIGEN"


def test_opt_out_keeps_xla_default_which_is_ynnpack():
  # If this fails, XLA no longer uses YNNPACK here: re-measure and drop the flag in flaxtl/__init__.
  assert _backend(FLAXTL_XLA_DEFAULTS="1") == "YNN"


def _flags_after_import(flags: str, **extra) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k not in ("FLAXTL_XLA_DEFAULTS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS=flags, **extra)
  out = subprocess.run([sys.executable, "-c", "import os, flaxtl; print(os.environ['XLA_FLAGS'])"],
                       env=env, capture_output=True, text=True, check=True)
  return out.stdout.split()


def test_user_flags_are_kept():
  assert _flags_after_import("--xla_force_host_platform_device_count=2") == [
      "--xla_force_host_platform_device_count=2", "--xla_cpu_experimental_ynn_fusion_type="]
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"  # the user's own choice wins
  assert _flags_after_import(mine) == [mine]


def test_not_applied_where_a_gpu_or_tpu_plugin_is_installed(tmp_path):
  (tmp_path / "jax_plugins").mkdir()  # what jax[cuda]/jax[tpu] install: computing happens there
  path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  assert _flags_after_import("--xla_dump_to=/tmp/x", **path) == ["--xla_dump_to=/tmp/x"]
  assert _flags_after_import("--xla_dump_to=/tmp/x", JAX_PLATFORMS="cpu", **path) == [
      "--xla_dump_to=/tmp/x", "--xla_cpu_experimental_ynn_fusion_type="]
