"""Command line: python -m convert {clip,uniformerv2,export,checkpoint} ...

  python -m convert clip --input ViT-B-16.pt --model b16 --output ckpt/clip_b16
  python -m convert uniformerv2 --input k400_b16.pyth --model b16 --set t_size=8 --output ckpt/k400
  python -m convert uniformerv2 --input k710_l14.pth --model l14 --head-map k400 --output ckpt/k400
  python -m convert export --input ckpt/k400 --layout original --output k400_b16.pyth
  python -m convert checkpoint --input runs/k710_b16/checkpoints/52000 --output ckpt/my_k710
"""

from __future__ import annotations

import argparse
import signal
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def common(s, model_help):
    s.add_argument("--input", required=True, help="PyTorch checkpoint file")
    s.add_argument("--model", required=True, help=model_help)
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field by its upstream name (repeatable), e.g. "
                        "t_size=16, return_list=[4,5,6,7,8,9,10,11], no_lmhra=false")
    s.add_argument("--output", required=True, help="model directory to create")
    s.add_argument("--class-names", default=None,
                   help="text file, one class name per line, or a packaged list: "
                        "k400|k600|k700|k710|mit|sthv2")
    s.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling (can run code from the file; trusted files only)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")

  model_help = ("b16 | l14 | l14_336 | CONFIG.json: a JSON object of ModelConfig fields by the "
                "upstream's names, optionally with \"name\": a preset they override, e.g. "
                "{\"name\": \"b16\", \"t_size\": 16} (a model directory's config.json "
                "also serves)")
  c = sub.add_parser("clip", help="CLIP image tower -> initial UniFormerV2 checkpoint")
  common(c, model_help)
  c.add_argument("--seed", type=int, default=0, help="seed of the newly initialised parts")
  u = sub.add_parser("uniformerv2", help="UniFormerV2 checkpoint (original or mmaction2)")
  common(u, model_help)
  u.add_argument("--head-map", default=None,
                 help="k400 | k600 | k700 | map.json: gather the rows of a K710 head")
  u.add_argument("--new-head", action="store_true",
                 help="initialise a new classifier (--set num_classes=N, --seed) instead of the "
                      "checkpoint's; for a backbone saved without one")
  u.add_argument("--seed", type=int, default=0, help="seed of the --new-head classifier")
  e = sub.add_parser("export", help="model directory or training checkpoint -> PyTorch state dict")
  e.add_argument("--input", required=True,
                 help="model directory, training workdir or WORKDIR/checkpoints/STEP")
  e.add_argument("--layout", required=True, choices=("original", "mmaction2"))
  e.add_argument("--output", required=True, help=".pyth/.pth file to write")
  e.add_argument("--flat", action="store_true",
                 help="write the bare state dict, without the model_state/state_dict wrapper "
                      "(what the original repository's UNIFORMERV2.PRETRAIN reads)")
  e.add_argument("--overwrite", action="store_true")
  k = sub.add_parser("checkpoint", help="training checkpoint -> model directory (weights only)")
  k.add_argument("--input", required=True,
                 help="training workdir (latest step) or WORKDIR/checkpoints/STEP")
  k.add_argument("--output", required=True, help="model directory to create")
  k.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  return p


def _exit_on_sigterm(signum, frame):
  raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary outputs are removed


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  import convert
  from convert.infer import parse_sets
  from uniformerv2_jax.checkpoint import CheckpointError, ClassNamesError
  from uniformerv2_jax.torch_layout import CheckpointMismatchError
  log = lambda msg: print(msg, flush=True)
  try:
    if args.command == "export":
      convert.export_file(args.input, args.layout, args.output, overwrite=args.overwrite,
                          flat=args.flat, log=log)
      return 0
    if args.command == "checkpoint":
      convert.checkpoint_to_model_dir(args.input, args.output, overwrite=args.overwrite, log=log)
      return 0
    sets = parse_sets(args.set)
    names = convert._read_class_names(args.class_names)
    if args.command == "clip":
      convert.convert_clip_file(args.input, args.model, args.output, sets=sets, seed=args.seed,
                                class_names=names, trust_pickle=args.trust_pickle,
                                overwrite=args.overwrite, log=log)
    else:
      convert.convert_uniformerv2_file(args.input, args.model, args.output, sets=sets,
                                       head_map=args.head_map, class_names=names,
                                       new_head=args.new_head, seed=args.seed,
                                       trust_pickle=args.trust_pickle,
                                       overwrite=args.overwrite, log=log)
  except ClassNamesError as e:
    given = getattr(args, "class_names", None)
    print(f"error: {f'--class-names {given}: ' if given else ''}{e}", file=sys.stderr, flush=True)
    return 2
  except (convert.ConversionError, CheckpointError, CheckpointMismatchError, ValueError,
          OSError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted; nothing was written to {args.output}", file=sys.stderr, flush=True)
    return 130
  return 0


if __name__ == "__main__":
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # Orbax's warnings repeat what the one error line says
  sys.exit(main())
