"""XLA:CPU's own convolutions (1.3-2.4x faster VGG16 steps than its default YNNPACK here,
benchmarks/RESULTS.md) are chosen where the process starts: `python -m flaxtl.<verb>`, or
`flaxtl.configure_cpu()` in the user's own script. `import flaxtl` changes nothing."""
import os
import subprocess
import sys

PROBE = """
import jax, jax.numpy as jnp
import flaxtl
{setup}
x, w = jnp.ones((8, 28, 28, 64)), jnp.ones((3, 3, 64, 64))
f = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
print("YNN" if "__ynn_fusion" in jax.jit(jax.grad(f)).lower(w, x).compile().as_text() else "EIGEN")
"""


def _run(code: str, **env) -> str:
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "FLAXTL_XLA_DEFAULTS", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-1] if out.stdout.split() else ""


def test_import_changes_nothing_and_keeps_xla_default_which_is_ynnpack():
  assert _run("import os, flaxtl; print(os.environ.get('XLA_FLAGS'))") == "None"
  # If this fails, XLA no longer uses YNNPACK here: re-measure and drop the flag (flaxtl/runtime.py).
  assert _run(PROBE.format(setup="")) == "YNN"


def test_configure_cpu_selects_xla_own_convolutions():
  assert _run(PROBE.format(setup="flaxtl.configure_cpu()")) == "EIGEN"
  assert _run(PROBE.format(setup="flaxtl.configure_cpu()"), FLAXTL_XLA_DEFAULTS="1") == "YNN"


def test_too_late_is_said_not_silent():
  code = ("import jax, flaxtl; jax.numpy.ones(1).block_until_ready(); "
          "print(flaxtl.configure_cpu())")
  assert _run(code) == "False"


def test_verbs_configure_it():
  """The verbs' entry point calls configure_cpu() before the verb runs."""
  code = ("import sys; from flaxtl import cli, runtime; calls = []; "
          "runtime.configure_cpu = lambda: calls.append(1); "
          "sys.argv = ['x', '--workdir', '/nonexistent/run', '--split', 'test']; "
          "exec('try:\\n cli.main(\"evaluate\")\\nexcept SystemExit: pass'); print(len(calls))")
  assert _run(code) == "1"


def _flags_after(flags: str, **extra) -> list[str]:
  code = "import os, flaxtl; flaxtl.configure_cpu(); print(os.environ['XLA_FLAGS'])"
  out = subprocess.run([sys.executable, "-c", code], env={
      **{k: v for k, v in os.environ.items() if k not in ("FLAXTL_XLA_DEFAULTS", "JAX_PLATFORMS")},
      "XLA_FLAGS": flags, **extra}, capture_output=True, text=True, check=True)
  return out.stdout.split()


def test_user_flags_are_kept():
  assert _flags_after("--xla_force_host_platform_device_count=2") == [
      "--xla_force_host_platform_device_count=2", "--xla_cpu_experimental_ynn_fusion_type="]
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"  # the user's own choice wins
  assert _flags_after(mine) == [mine]


def test_not_applied_where_a_gpu_or_tpu_plugin_is_installed(tmp_path):
  (tmp_path / "jax_plugins").mkdir()  # what jax[cuda]/jax[tpu] install: computing happens there
  path = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  assert _flags_after("--xla_dump_to=/tmp/x", **path) == ["--xla_dump_to=/tmp/x"]
  assert _flags_after("--xla_dump_to=/tmp/x", JAX_PLATFORMS="cpu", **path) == [
      "--xla_dump_to=/tmp/x", "--xla_cpu_experimental_ynn_fusion_type="]
