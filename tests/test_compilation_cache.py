"""The verbs keep JAX's compiled programs in flaxtl's cache (flaxtl/runtime.py): a second process
loads what the first one compiled instead of compiling it again; the user's own folder, or
FLAXTL_COMPILATION_CACHE=0, is respected; a folder that cannot be made turns it off (JAX would
warn at every program); `import flaxtl` alone sets nothing."""
import json
import os
import subprocess
import sys

PROGRAM = """
import json, os
from flaxtl import runtime
folder = runtime.configure_compilation_cache()  # as cli.main does: before jax is imported
import jax, jax.numpy as jnp
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
y = float(f(jnp.arange(64.0).reshape(8, 8) / 64))
print(json.dumps({"folder": folder, "jax": jax.config.jax_compilation_cache_dir,
                  "hits": len(hits), "y": y}))
"""


def _run(code: str, **env) -> dict:
  base = {k: v for k, v in os.environ.items()  # the suite's own cache (conftest) is not the user's
          if k not in ("JAX_COMPILATION_CACHE_DIR", "FLAXTL_COMPILATION_CACHE")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**base, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  first = _run(PROGRAM, FLAXTL_CACHE_DIR=str(tmp_path))
  folder = tmp_path / "jax"
  assert first["folder"] == first["jax"] == str(folder) and first["hits"] == 0
  assert any(p.name.startswith("jit_") for p in folder.iterdir())
  second = _run(PROGRAM, FLAXTL_CACHE_DIR=str(tmp_path))
  assert second["hits"] >= 1 and second["y"] == first["y"]


def test_the_users_folder_or_opt_out_is_respected(tmp_path):
  mine = _run(PROGRAM, FLAXTL_CACHE_DIR=str(tmp_path),
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "x"))
  assert mine["folder"] is None and mine["jax"] == str(tmp_path / "x")
  off = _run(PROGRAM, FLAXTL_CACHE_DIR=str(tmp_path), FLAXTL_COMPILATION_CACHE="0")
  assert off["folder"] is None and off["jax"] is None and not (tmp_path / "jax").exists()
  (tmp_path / "a_file").write_text("")  # a cache folder that cannot be made: off, said once
  bad = _run(PROGRAM, FLAXTL_CACHE_DIR=str(tmp_path / "a_file"))
  assert bad["folder"] is None and bad["jax"] is None


def test_import_sets_nothing_and_the_verbs_configure_it():
  code = "import json, os, flaxtl; print(json.dumps(os.environ.get('JAX_COMPILATION_CACHE_DIR')))"
  assert _run(code) is None
  code = ("import sys; from flaxtl import cli, runtime; calls = []; "
          "runtime.configure_compilation_cache = lambda: calls.append(1); "
          "sys.argv = ['x', '--workdir', '/nonexistent/run', '--split', 'test']; "
          "exec('try:\\n cli.main(\"evaluate\")\\nexcept SystemExit: pass'); print(len(calls))")
  assert _run(code) == 1
