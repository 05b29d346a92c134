"""Convert VGG16 weights (Keras .h5/.weights.h5/.keras, torchvision .safetensors/.pth) for flaxtl.

Why a separate step: conversion validates the file once, records its preprocessing convention and
gives one file that training loads fast. Without INPUT, Keras' cached official notop file is used
($KERAS_HOME/models or ~/.keras/models), downloaded when missing.

  python scripts/convert_vgg16.py [INPUT] --out OUT.msgpack [--include-top]

On a bad input: a message naming the file and layer on stderr, exit code 1, OUT untouched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxtl import weights


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("input", nargs="?", help="weights file (default: Keras' cached official file)")
  parser.add_argument("--out", required=True, help="output file (flaxtl's msgpack format)")
  parser.add_argument("--include-top", action="store_true",
                      help="without INPUT: the full Keras file (with fc1, fc2, predictions; 528 MiB)")
  args = parser.parse_args(argv)
  try:
    params, meta = weights.load(weights.resolve(args.input, include_top=args.include_top))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # --out into a new folder
    weights.save(params, meta, args.out)
  except (weights.WeightsError, OSError) as e:  # OSError: OUT cannot be written
    print(f"error: {e}", file=sys.stderr)
    return 1
  layers = meta["layers"]
  print(f"source         {meta['source']} ({meta['file']})\n"
        f"preprocessing  {meta['preprocessing']}\n"
        f"layers         {len(layers)}: {layers[0]} ... {layers[-1]}"
        f" (include_top={meta['include_top']})\n"
        f"parameters     {meta['num_params']:,}\n"
        f"sha256         {meta['sha256']}\n"
        f"wrote          {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
